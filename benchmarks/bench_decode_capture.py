"""Decode-step capture: `mid` decode, eager vs `DecodeRunner`, against the machine's read bandwidth.

One run writes the `mid` checkpoint (the release's widths, 2 layers), loads it, and measures in
this process, rounds interleaved so that noise hits every variant alike (medians reported):
- a decode step at batch 1 and 8 — metadata, model step, lm_head, greedy pick — run eagerly
  (`model(...)`, what the engine does today) and through `DecodeRunner` (captured);
- the roofline of gemv_roofline.py: GEMV and plain-read (`w.sum()`) rates over a 1 GiB working
  set of the decoder's weight shapes, one pass per round.
The batch-1 token's weight bytes (attention, dense MLP, router, shared + top-k routed experts,
norms, lm_head; as BENCHMARKS.md counts them) over the step time is its effective bandwidth,
reported as a fraction of the plain read. `--profile` adds torch.profiler tables of the steps.
`--baseline REV` adds the eager step with MLA's decode methods as they were at git revision REV
(the absorbed decode is the part of the eager step this work changed), in the same rounds.

    python benchmarks/bench_decode_capture.py --dtype bfloat16 --baseline 594d7f3 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from services.common.checkpoint import write_checkpoint  # noqa: E402
from services.decoder.loading import load_text_model  # noqa: E402
from services.decoder.model.compiled import DecodeRunner  # noqa: E402
from services.decoder.model.decoder import DecoderForCausalLM  # noqa: E402
from services.decoder.model.kv_cache import PAD_BLOCK, AttentionMetadata, PagedKVCache  # noqa: E402
from services.decoder.model.mla import MLAttention  # noqa: E402

BLOCK_SIZE = 16
SHAPES = [(11264, 2048), (2048, 11264), (2816, 2048), (2048, 1408), (3072, 2048)]  # gemv_roofline's
WORKING_SET_BYTES = 1 << 30
Step = Callable[[torch.Tensor, AttentionMetadata, PagedKVCache], torch.Tensor]
Variant = tuple[Step, "dict[str, Callable] | None"]  # a step, and MLA decode methods to swap in for it
_MLA_DECODE_METHODS = ("_absorbed_weights", "_decode_absorbed")


class Roofline:
    """gemv_roofline.py's method: cycle over more weights than any cache holds."""

    def __init__(self, dtype: torch.dtype) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.weights: list[torch.Tensor] = []
        while sum(w.numel() * itemsize for w in self.weights) < WORKING_SET_BYTES:
            out_f, in_f = SHAPES[len(self.weights) % len(SHAPES)]
            self.weights.append(torch.empty(out_f, in_f, dtype=dtype).normal_())
        self.xs = {in_f: torch.randn(1, in_f).to(dtype) for _, in_f in SHAPES}
        self.bytes = sum(w.numel() * itemsize for w in self.weights)

    def gemv_gbps(self) -> float:
        start = time.perf_counter()
        for w in self.weights:
            F.linear(self.xs[w.shape[1]], w)
        return self.bytes / (time.perf_counter() - start) / 1e9

    def read_gbps(self) -> float:
        start = time.perf_counter()
        for w in self.weights:
            w.sum()
        return self.bytes / (time.perf_counter() - start) / 1e9


def token_bytes(model: DecoderForCausalLM) -> int:
    """Weight bytes one batch-1 decode token reads: all but the embedding table (one row) and
    the routed experts, plus top-k routed experts per MoE layer."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith(("experts.w13", "experts.w2")):
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif name == "model.embed_tokens.weight":
            size = 0
        total += size
    return total


class DecodeLoop:
    """B sequences prefilled with a prompt; `run` times decode steps from the same state each time."""

    def __init__(self, model: DecoderForCausalLM, batch: int, prompt: int, steps: int) -> None:
        cfg, dtype = model.cfg, model.lm_head.weight.dtype
        per_seq = -(-(prompt + steps) // BLOCK_SIZE)
        # block 0 (PAD_BLOCK) is never a sequence's: the runner's scratch slot lives there
        self.cache = PagedKVCache(
            cfg.num_hidden_layers, 1 + batch * per_seq, BLOCK_SIZE, cfg.latent_dim, dtype, "cpu"
        )
        self.tables = [list(range(1 + b * per_seq, 1 + (b + 1) * per_seq)) for b in range(batch)]
        self.model, self.batch, self.prompt, self.steps = model, batch, prompt, steps
        ids = torch.randint(0, 1000, (batch * prompt,), generator=torch.Generator().manual_seed(0))
        pre = AttentionMetadata.for_prefill(self.tables, [prompt] * batch, block_size=BLOCK_SIZE)
        with torch.inference_mode():
            hidden = model(ids, pre.positions, pre, self.cache)
            self.first = model.compute_logits(hidden[prompt - 1 :: prompt]).argmax(-1)

    @torch.inference_mode()
    def run(self, step: Step, steps: int | None = None) -> list[float]:
        """Seconds per decode step: metadata, model step, lm_head, greedy pick."""
        ids, times = self.first, []
        for i in range(steps or self.steps):
            start = time.perf_counter()
            attn = AttentionMetadata.for_decode(
                self.tables, [self.prompt + 1 + i] * self.batch, block_size=BLOCK_SIZE
            )
            ids = self.model.compute_logits(step(ids, attn, self.cache)).argmax(-1)
            times.append(time.perf_counter() - start)
        return times


def mla_decode_at(rev: str) -> dict[str, Callable]:
    """MLAttention's decode methods as services/decoder/model/mla.py had them at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:services/decoder/model/mla.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"mla_at_{rev}")
    exec(compile(source, f"services/decoder/model/mla.py@{rev}", "exec"), module.__dict__)
    return {name: getattr(module.MLAttention, name) for name in _MLA_DECODE_METHODS}


@contextlib.contextmanager
def swapped_mla(model: DecoderForCausalLM, methods: dict[str, Callable] | None) -> Iterator[None]:
    """Run with MLAttention's decode methods replaced; restores methods and the layers' absorbed
    weights (the same objects: the captured step holds them) on exit."""
    if methods is None:
        yield
        return
    layers = [layer.self_attn for layer in model.model.layers]
    saved = {name: MLAttention.__dict__[name] for name in methods}
    caches = [attn._absorbed for attn in layers]
    try:
        for name, method in methods.items():
            setattr(MLAttention, name, method)
        for attn in layers:
            attn._absorbed = None
        yield
    finally:
        for name, method in saved.items():
            setattr(MLAttention, name, method)
        for attn, cache in zip(layers, caches, strict=True):
            attn._absorbed = cache


def profile_table(loop: DecodeLoop, step: Step, mla: dict[str, Callable] | None, rows: int) -> str:
    """torch.profiler's top ops of 10 steps, by self CPU time, as a markdown table."""
    with swapped_mla(loop.model, mla), profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.run(step, 10)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | share of step | ms per step | calls per step |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(
            f"| `{e.key}` | {e.self_cpu_time_total / total:.1%} | {e.self_cpu_time_total / 10 / 1e3:.2f} | "
            f"{e.count / 10:g} |"
        )
    return "\n".join(lines)


def measure(
    loops: dict[int, DecodeLoop], steps: dict[str, Variant], roofline: Roofline, rounds: int
) -> tuple[dict[tuple[int, str], float], float, float]:
    """Median seconds per step of each (batch, variant), plain-read and GEMV GB/s; interleaved."""
    times: dict[tuple[int, str], list[float]] = {(b, name): [] for b in loops for name in steps}
    reads, gemvs = [], []
    for r in range(rounds + 1):  # round 0 warms up
        read, gemv = roofline.read_gbps(), roofline.gemv_gbps()
        for b, loop in loops.items():
            for name, (step, mla) in steps.items():
                with swapped_mla(loop.model, mla):
                    median = statistics.median(loop.run(step))
                if r:
                    times[b, name].append(median)
        if r:
            reads.append(read)
            gemvs.append(gemv)
    medians = {key: statistics.median(v) for key, v in times.items()}
    return medians, statistics.median(reads), statistics.median(gemvs)


def report(
    medians: dict[tuple[int, str], float], warm: dict[int, float], base: str | None, read: float, nbytes: int
) -> list[dict[str, float]]:
    """Print the markdown table; return its rows."""
    names = ([base] if base else []) + ["eager", "captured"]
    head = " | ".join(f"{n} tok/s" for n in names)
    ratios = "captured / eager" + (f" | captured / {base}" if base else "")
    print(f"| batch | {head} | {ratios} | first 2 captured steps (s) | batch-1 GB/s | of plain read |")
    print("|---" * (len(names) + (6 if base else 5)) + "|")
    rows = []
    for b in warm:
        row = {f"{n}_tok_s": b / medians[b, n] for n in names}
        row |= {"batch": b, "ratio": medians[b, "eager"] / medians[b, "captured"], "warmup_s": warm[b]}
        cells = [f"{row[f'{n}_tok_s']:.1f}" for n in names] + [f"{row['ratio']:.2f}x"]
        if base:
            row["ratio_base"] = medians[b, base] / medians[b, "captured"]
            cells.append(f"{row['ratio_base']:.2f}x")
        cells.append(f"{warm[b]:.1f}")
        if b == 1:
            gbps = [nbytes / medians[b, n] / 1e9 for n in names]
            cells += [" → ".join(f"{g:.1f}" for g in gbps), " → ".join(f"{g / read:.0%}" for g in gbps)]
        else:
            cells += ["—", "—"]
        print(f"| {b} | " + " | ".join(cells) + " |")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--mode", default="auto", help="the DecodeRunner mode to compare with eager")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per variant and round")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", default=None, help="also time MLA's decode as at this git revision")
    parser.add_argument("--profile", action="store_true", help="print op tables of the batch-1 steps")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_text_model(write_checkpoint(Path(tmp) / "mid", preset="mid", dtype=dtype), dtype).eval()
    # PAD_BLOCK is never a sequence's block here (DecodeLoop), so the scratch slot can live in it
    runner = DecodeRunner(
        model, mode=args.mode, max_batch_size=max(args.batches), scratch_slot=PAD_BLOCK * BLOCK_SIZE
    )
    loops = {b: DecodeLoop(model, b, args.prompt, args.steps) for b in args.batches}
    eager: Step = lambda ids, attn, cache: model(ids, attn.positions, attn, cache)  # noqa: E731
    base = f"eager@{args.baseline}" if args.baseline else None
    steps: dict[str, Variant] = {base: (eager, mla_decode_at(args.baseline))} if base else {}
    steps |= {"eager": (eager, None), "captured": (runner, None)}
    warm = {}
    for b, loop in loops.items():  # the first calls compile or capture
        start = time.perf_counter()
        loop.run(runner, 2)
        warm[b] = time.perf_counter() - start
    medians, read, gemv = measure(loops, steps, Roofline(dtype), args.rounds)
    nbytes = token_bytes(model)
    print(
        f"mid {args.dtype}, {torch.get_num_threads()} threads, runner mode {runner._resolved}; plain read "
        f"{read:.1f} GB/s, GEMV {gemv:.1f} GB/s (medians of {args.rounds}); a batch-1 token reads "
        f"{nbytes / 1e6:.1f} MB\n"
    )
    rows = report(medians, warm, base, read, nbytes)
    if args.profile and 1 in loops:
        for name, (step, mla) in steps.items():
            print(f"\nbatch 1, {name} step (torch.profiler, self CPU time):\n")
            print(profile_table(loops[1], step, mla, 14))
    if args.out:
        summary = {"read_gbps": read, "gemv_gbps": gemv, "token_bytes": nbytes, "rows": rows}
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
