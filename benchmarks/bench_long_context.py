"""Long prompts: time to first token and peak resident memory against prompt length (issue #18).

Each point runs in a fresh process (so its peak RSS is its own): load the decoder, build an engine
whose KV cache holds the prompt, run a short warm-up request, then one random prompt of L tokens
(nothing shared with the warm-up, so no prefix hit) with max_new_tokens 1; TTFT is submit -> the
first token, through the engine's chunked prefill (max_num_batched_tokens per step).

Per point:
- `bound_s`: the compute bound, the prompt's FLOPs over a GEMM rate measured in the same process
  (F.linear at [2048 tokens, 2048] x [2048, 2816] in the model's dtype, the best of 5 timings).
  FLOPs: every matmul weight once per token (the LM head once: only the last token's logits
  are needed), plus causal attention, 2 * heads * (qk + v dims) * L^2 / 2 per layer.
- `extra_gib`: the resident peak during the prompt (the high-water mark is reset after loading
  and the warm-up) less RSS before it and less the KV cache the prompt fills: what prefill
  itself held at its peak (activations, attention's working set).
- `--baseline`: the same points with prefill attention as it was before this change (one masked
  SDPA over the whole context: the math kernel, scores [heads, chunk, context]) for a ratio in the
  same run; its points stop at `--baseline-max`.

    python benchmarks/bench_long_context.py --preset tiny --dtype float32 \\
        --lengths 2048 4096 8192 16384 32768 65536 131000 --baseline --baseline-max 16384
    python benchmarks/bench_long_context.py --checkpoint /path/mid --dtype float32 \\
        --lengths 2048 4096 8192 16384 32768 --baseline --baseline-max 8192
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.common.checkpoint import write_checkpoint
from services.common.devices import DTYPES
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model
from services.decoder.model import mla

GIB = float(1 << 30)
GEMM_SHAPE = (2048, 2048, 2816)  # [tokens, in, out]: a prefill chunk through a dense projection


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Restart the kernel's resident high-water mark (VmHWM) here: loading peaks otherwise hide
    what prefill itself holds."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def gemm_gflops(dtype: torch.dtype, trials: int = 5, rounds: int = 4) -> float:
    """The best of `trials` timings: on a shared 2-vCPU machine single timings vary by 30%."""
    t, k, n = GEMM_SHAPE
    x, w = torch.randn(t, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(2):
        F.linear(x, w)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(rounds):
            F.linear(x, w)
        best = max(best, 2 * t * k * n * rounds / (time.perf_counter() - start) / 1e9)
    return best


def prefill_flops(model: torch.nn.Module, length: int) -> float:
    """Matmul weights once per token (experts: the top-k and the shared ones), the LM head once,
    causal attention per layer."""
    cfg = model.cfg
    per_token = head = expert_params = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name.endswith("embed_tokens.weight"):
            continue
        if name.startswith("lm_head"):
            head += p.numel()
        elif ".experts.w" in name:
            expert_params += p.numel() // cfg.n_routed_experts
        else:
            per_token += p.numel()
    per_token += cfg.num_experts_per_tok * expert_params  # expert_params sums over the MoE layers
    attention = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 2.0 * (length * per_token + head) + 2.0 * attention * length * length / 2


def _one_shot_prefill(
    self: mla.MLAttention,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    attn: Any,
    kv_cache: Any,
    first_seq: int,
) -> torch.Tensor:
    """The prefill attention before issue #18: the whole context decompressed, one masked SDPA."""
    q = torch.cat([q_nope, q_pe], dim=-1)
    outs, start = [], 0
    seqs = zip(attn.query_lens[first_seq:], attn.context_lens[first_seq:], strict=True)
    for b, (q_len, ctx) in enumerate(seqs, start=first_seq):
        latents = kv_cache.gather(self.layer_idx, attn.block_tables[b : b + 1], ctx)[0].to(q.dtype)
        k, v = self._expand(latents)  # [nH, C, d], [nH, C, dv]
        q_pos = torch.arange(ctx - q_len, ctx)
        mask = torch.arange(ctx)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(
            q[start : start + q_len].transpose(0, 1), k, v, attn_mask=mask, scale=self.scale
        )
        outs.append(out.transpose(0, 1))
        start += q_len
    return torch.cat(outs, dim=0)


def measure_point(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.one_shot:
        mla.MLAttention._prefill_expanded = _one_shot_prefill  # type: ignore[method-assign]
    model = load_text_model(args.checkpoint, dtype, "cpu")
    gflops = gemm_gflops(dtype)
    length = args.point
    # max_model_len: the model's, or the cache's when that is smaller
    config = EngineConfig(kv_cache_tokens=length + 1024, max_num_seqs=4, max_num_batched_tokens=args.chunk)
    engine = LLMEngine(model, config)
    gen = torch.Generator().manual_seed(length)
    warm = torch.randint(10, 1000, (64,), generator=gen).tolist()  # plain tokens, no special ids
    list(engine.generate(warm, SamplingParams(max_new_tokens=2)))
    loaded = _rss_bytes()
    _reset_peak()
    prompt = torch.randint(10, 1000, (length,), generator=gen).tolist()
    start = time.perf_counter()
    outs = list(engine.generate(prompt, SamplingParams(max_new_tokens=1)))
    ttft = time.perf_counter() - start
    assert outs and outs[0].cached_tokens == 0
    peak = _peak_bytes()
    kv = length * model.cfg.num_hidden_layers * model.cfg.latent_dim * dtype.itemsize
    flops = prefill_flops(model, length)
    bound = flops / (gflops * 1e9)
    return {
        "length": length,
        "attention": "one-shot (before)" if args.one_shot else "segmented",
        "ttft_s": round(ttft, 3),
        "bound_s": round(bound, 3),
        "ttft_over_bound": round(ttft / bound, 2),
        "gemm_gflops": round(gflops, 1),
        "peak_rss_gib": round(peak / GIB, 3),
        "kv_gib": round(kv / GIB, 3),
        "extra_gib": round((peak - loaded - kv) / GIB, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: write --preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (prefill chunk)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--baseline", action="store_true", help="also run the one-shot attention of before")
    p.add_argument("--baseline-max", type=int, default=16384, help="longest prompt for --baseline")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    p.add_argument("--json", default=None, help="write the rows here too")
    p.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-shot", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point is not None:
        print(json.dumps(measure_point(args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(
            write_checkpoint(Path(tmp) / args.preset, preset=args.preset, dtype=DTYPES[args.dtype])
        )
        rows = []
        for length in args.lengths:
            for one_shot in (False, True) if args.baseline and length <= args.baseline_max else (False,):
                cmd = [sys.executable, __file__, "--checkpoint", checkpoint, "--dtype", args.dtype,
                       "--chunk", str(args.chunk), "--threads", str(args.threads),
                       "--point", str(length)]  # fmt: skip
                if one_shot:
                    cmd.append("--one-shot")
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    row = (
                        json.loads(done.stdout.strip().splitlines()[-1])
                        if done.returncode == 0
                        else {"length": length, "failed": f"exit {done.returncode}: {done.stderr[-300:]}"}
                    )
                except subprocess.TimeoutExpired:
                    row = {"length": length, "failed": f"over {args.timeout} s"}
                row.setdefault("attention", "one-shot (before)" if one_shot else "segmented")
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
