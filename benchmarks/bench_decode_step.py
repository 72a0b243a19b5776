"""Decode steps of the engine alone, with and without the oneDNN-prepacked projections.

One process loads the checkpoint twice (one copy prepacked by `LLMEngine`, one left as
`nn.Linear`), and for each batch size B starts B requests with distinct random 64-token prompts
(`--same-prompt`: one prompt for all, as `kimi-vl bench`'s text workload sends, so the batch routes
to the same experts), runs their prefill, then times decode steps, the two variants interleaved
round by round (medians). For each point it also prints the bytes the step must read (dense
weights, the routed experts the batch touches, the KV latents are negligible here) over the
step time, against the plain-read rate of `gemv_roofline.py` measured in the same process.

    python benchmarks/bench_decode_step.py --checkpoint /work/ckpt/mid --dtype float32 --batches 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model
from services.decoder.model.moe import MoE


def _engine(model: torch.nn.Module, batch: int, prepack: bool, same: bool) -> LLMEngine:
    engine = LLMEngine(model, EngineConfig(kv_cache_tokens=16384, max_num_seqs=64, prepack_weights=prepack))
    gen = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        prompt = list(range(64)) if same else torch.randint(0, 1000, (64,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=10_000, ignore_eos=True))
    while engine.scheduler.num_waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    return engine


def _step_bytes(model: torch.nn.Module, engine: LLMEngine) -> int:
    """Dense parameters plus the routed experts this batch's tokens pick (from one routed step)."""
    total = 0
    for name, p in model.named_parameters():
        if ".experts." not in name:
            total += p.numel() * p.element_size()
    picked: list[set[int]] = []
    hooks = []
    for module in model.modules():
        if isinstance(module, MoE):
            seen: set[int] = set()
            picked.append(seen)
            hooks.append(
                module.experts.register_forward_hook(
                    lambda m, args, out, seen=seen: seen.update(args[2].flatten().tolist())
                )
            )
    engine.step()
    for h in hooks:
        h.remove()
    for module, seen in zip([m for m in model.modules() if isinstance(m, MoE)], picked, strict=True):
        per_expert = (
            module.experts.w13[0].numel() + module.experts.w2[0].numel()
        ) * module.experts.w13.element_size()
        total += per_expert * len(seen)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--same-prompt", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"threads {torch.get_num_threads()}, dtype {dtype}, CPU capability {capability}")
    models = {False: load_text_model(args.checkpoint, dtype), True: load_text_model(args.checkpoint, dtype)}
    probe = torch.randn((1 << 30) // torch.empty((), dtype=dtype).element_size()).to(
        dtype
    )  # 1 GiB: past any cache
    for _ in range(2):
        probe.sum()
    start = time.perf_counter()
    for _ in range(4):
        probe.sum()
    read_gbps = 4 * probe.numel() * probe.element_size() / (time.perf_counter() - start) / 1e9
    print(f"plain read: {read_gbps:.1f} GB/s")
    for batch in args.batches:
        engines = {p: _engine(models[p], batch, p, args.same_prompt) for p in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for prepack, engine in engines.items():
                for _ in range(args.steps):
                    t = time.perf_counter()
                    engine.step()
                    times[prepack].append(time.perf_counter() - t)
        base, packed = statistics.median(times[False]), statistics.median(times[True])
        nbytes = _step_bytes(models[True], engines[True])
        bound = nbytes / (read_gbps * 1e9)
        print(
            f"batch {batch:3d}: nn.Linear {base * 1e3:6.1f} ms, prepacked {packed * 1e3:6.1f} ms "
            f"({base / packed:.2f}x); reads {nbytes / 1e6:.0f} MB -> bound {bound * 1e3:.1f} ms "
            f"(prepacked at {bound / packed:.0%} of the plain-read rate)"
        )


if __name__ == "__main__":
    main()
