"""Decoder prefill and decode speed: this project's engine vs transformers on the same weights.

For each checkpoint preset, one run writes the checkpoint, loads it with our loader and as a
transformers `DeepseekV3ForCausalLM` (the same tensors), and measures, in this process:
- prefill tokens/s for one prompt of --prefill-len tokens (ours: one engine step through the
  paged cache; transformers: one forward with its cache);
- decode tokens/s at batch 1 (ours: `LLMEngine.generate`; transformers: `generate`, greedy),
  counting the tokens after the first and timing them without the prefill.
Prints a markdown table with ratios ours / transformers. Usage:

    python benchmarks/bench_decoder.py --presets tiny mid --out bench_decoder.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.common.checkpoint import write_checkpoint
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model
from services.decoder.model.hf_reference import export_hf_decoder, load_hf_decoder


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Ours:
    def __init__(self, model, prompt: list[int], new_tokens: int) -> None:
        cache_tokens = len(prompt) + new_tokens + 64
        self.engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_tokens=cache_tokens))
        self.prompt, self.new_tokens = prompt, new_tokens

    def _run(self, prompt: list[int], n: int) -> None:
        for _ in self.engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)):
            pass

    def prefill(self) -> None:
        self._run(self.prompt, 1)

    def decode(self, n: int) -> None:
        self._run(self.prompt[:DECODE_PROMPT], n)


class _Transformers:
    def __init__(self, model, prompt: list[int], new_tokens: int) -> None:
        self.model, self.ids = model, torch.tensor([prompt])

    @torch.inference_mode()
    def prefill(self) -> None:
        self.model(self.ids, use_cache=True)

    @torch.inference_mode()
    def decode(self, n: int) -> None:
        short = self.ids[:, :DECODE_PROMPT]
        self.model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _measure(runners: dict, new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median prefill and decode seconds per runner, runs interleaved so noise hits all alike.

    Decode time = time(prompt + new_tokens) - time(prompt + 1 token): the tokens after the first.
    """
    samples: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in runners}
    for r in range(repeats + 1):  # the first round warms up
        for name, runner in runners.items():
            prefill = _timed(runner.prefill)
            full = _timed(lambda runner=runner: runner.decode(new_tokens))
            decode = full - _timed(lambda runner=runner: runner.decode(1))
            if r:
                samples[name]["prefill"].append(prefill)
                samples[name]["decode"].append(decode)
    return {k: (statistics.median(v["prefill"]), statistics.median(v["decode"])) for k, v in samples.items()}


DECODE_PROMPT = 32


def bench_preset(preset: str, prefill_len: int, new_tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / preset, preset=preset, dtype=dtype, shard_bytes=512 * 2**20)
        hf_dir = Path(tmp) / "hf"
        prompt = torch.randint(0, 1000, (prefill_len,), generator=torch.Generator().manual_seed(0)).tolist()
        runners = {
            "ours": _Ours(load_text_model(ckpt, dtype), prompt, new_tokens),
            "hf": _Transformers(
                load_hf_decoder(export_hf_decoder(ckpt, hf_dir, eos=False), dtype), prompt, new_tokens
            ),
        }
        times = _measure(runners, new_tokens, repeats)
    (our_prefill, our_decode), (hf_prefill, hf_decode) = times["ours"], times["hf"]
    row = {
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "prefill_len": prefill_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "ours_prefill_tok_s": prefill_len / our_prefill,
        "hf_prefill_tok_s": prefill_len / hf_prefill,
        "ours_decode_tok_s": (new_tokens - 1) / our_decode,
        "hf_decode_tok_s": (new_tokens - 1) / hf_decode,
    }
    row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"]
    row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [bench_preset(p, args.prefill_len, args.new_tokens, args.repeats, dtype) for p in args.presets]
    print(
        "| preset | dtype | prefill tok/s ours | transformers | ratio "
        "| decode b=1 tok/s ours | transformers | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['dtype']} | {r['ours_prefill_tok_s']:.0f} | {r['hf_prefill_tok_s']:.0f} | "
            f"{r['prefill_ratio']:.2f}x | {r['ours_decode_tok_s']:.1f} | {r['hf_decode_tok_s']:.1f} | "
            f"{r['decode_ratio']:.2f}x |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
