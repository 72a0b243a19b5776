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
from services.common.weights import load_text_model
from services.decoder.engine import EngineConfig, LLMEngine
from services.decoder.hf_reference import export_hf_decoder, load_hf_decoder
from services.decoder.sampling import SamplingParams


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(model, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_tokens=len(prompt) + new_tokens + 64))

    def prefill() -> None:
        next(iter(engine.generate(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))))

    def full() -> None:
        for _ in engine.generate(prompt[:32], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            pass

    def first_only() -> None:
        for _ in engine.generate(prompt[:32], SamplingParams(max_new_tokens=1, ignore_eos=True)):
            pass

    t_prefill = _median_time(prefill, repeats)
    t_decode = _median_time(full, repeats) - _median_time(first_only, repeats)
    return len(prompt) / t_prefill, (new_tokens - 1) / t_decode


def _transformers(ref, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    short = ids[:, :32]

    @torch.inference_mode()
    def prefill() -> None:
        ref(ids, use_cache=True)

    @torch.inference_mode()
    def generate(n: int) -> None:
        ref.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    t_prefill = _median_time(prefill, repeats)
    t_decode = _median_time(lambda: generate(new_tokens), repeats) - _median_time(
        lambda: generate(1), repeats
    )
    return len(prompt) / t_prefill, (new_tokens - 1) / t_decode


def bench_preset(preset: str, prefill_len: int, new_tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / preset, preset=preset, dtype=dtype, shard_bytes=512 * 2**20)
        ours = load_text_model(ckpt, dtype)
        prompt = torch.randint(0, 1000, (prefill_len,), generator=torch.Generator().manual_seed(0)).tolist()
        our_prefill, our_decode = _ours(ours, prompt, new_tokens, repeats)
        del ours
        ref = load_hf_decoder(export_hf_decoder(ckpt, Path(tmp) / "hf", eos=False), dtype)
        hf_prefill, hf_decode = _transformers(ref, prompt, new_tokens, repeats)
    return {
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "prefill_len": prefill_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "ours_prefill_tok_s": our_prefill,
        "hf_prefill_tok_s": hf_prefill,
        "ours_decode_tok_s": our_decode,
        "hf_decode_tok_s": hf_decode,
        "prefill_ratio": our_prefill / hf_prefill,
        "decode_ratio": our_decode / hf_decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
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
