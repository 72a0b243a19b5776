"""MoE kernels vs their PyTorch references at Kimi-VL's expert shapes, on one CUDA GPU.

For each batch size T (decode: 1, 8, 64; prefill: 4096) with the release's MoE layer (E=64
routed experts of width I=1408, top-6, hidden H=2048, 2 shared experts, bf16 by default), times
in this process, kernel by kernel and for the whole layer:
- routing: `grouped_topk` vs `grouped_topk_ref` (router logits -> top-k weights and ids);
- align: `moe_align` vs `moe_align_ref`;
- gate/up and down: the two `grouped_gemm` launches vs `grouped_gemm_ref`;
- combine: `moe_combine` vs `moe_combine_ref`;
- experts: `fused_experts` (align + 2 GEMMs + combine) vs `fused_experts_ref` (the per-expert loop);
- MoE layer: `services.decoder.model.moe.MoE` (router, routing, experts, shared experts) with
  KIMI_VL_MOE_BACKEND=triton vs =torch.
Times are medians of `triton.testing.do_bench` (L2 flushed between runs). For decode sizes it
also prints the achieved memory bandwidth: bytes of the weights the step actually reads (the
routed experts that received tokens, the shared experts and the router) / time, and that as a
fraction of --peak-gbps (default: H100 SXM, 3350 GB/s). Without CUDA it prints that nothing was
measured and exits 0: Triton's CPU interpreter timings say nothing about GPU speed. Usage:

    python benchmarks/bench_moe.py
    python benchmarks/bench_moe.py --tokens 1 8 64 4096 --dtype bfloat16 --peak-gbps 3350 --out moe.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

N_EXPERTS, TOP_K, HIDDEN, WIDTH = 64, 6, 2048, 1408  # E, K, H, I of the release
DUMMY_SPECIAL_IDS = {"[BOS]": 0, "<|im_end|>": 1, "[PAD]": 2, "<|media_pad|>": 3}


def _release_moe(dtype: torch.dtype):
    """The release's MoE layer on the GPU, random weights (experts in `dtype`, router fp32)."""
    from services.common.checkpoint import build_config
    from services.common.config import parse_text_config
    from services.decoder.model.moe import MoE

    raw = build_config("mid", 163840, DUMMY_SPECIAL_IDS)["text_config"]
    cfg = parse_text_config(raw)
    if (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size) != (
        N_EXPERTS,
        TOP_K,
        HIDDEN,
        WIDTH,
    ):
        raise SystemExit("bench_moe: the mid preset no longer has the release's expert shapes")
    with torch.device("cuda"):
        moe = MoE(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    moe.experts.to(dtype)
    if moe.shared_experts is not None:
        moe.shared_experts.to(dtype)
    return moe


def _bench(fn: Callable[[], object]) -> float:
    """Median seconds of fn()."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def _moe_layer(moe, x: torch.Tensor, backend: str) -> Callable[[], object]:
    def run() -> object:
        os.environ["KIMI_VL_MOE_BACKEND"] = backend
        return moe(x)

    return run


def _pairs(moe, x: torch.Tensor) -> tuple[dict[str, tuple[Callable, Callable]], torch.Tensor]:
    """op -> (kernel run, reference run) on the same inputs, and the routed ids."""
    from services.decoder.model.moe import select_experts
    from triton_kernels import (
        fused_experts,
        fused_experts_ref,
        grouped_gemm,
        grouped_gemm_ref,
        grouped_topk,
        grouped_topk_ref,
        moe_align,
        moe_align_ref,
        moe_combine,
        moe_combine_ref,
    )
    from triton_kernels.fused_experts import block_m_for

    cfg, w13, w2 = moe.cfg, moe.experts.w13.detach(), moe.experts.w2.detach()
    logits, bias = moe.gate(x), moe.gate.e_score_correction_bias
    os.environ["KIMI_VL_MOE_BACKEND"] = "triton"
    weights, ids = select_experts(logits, bias, cfg)
    align = moe_align(ids, N_EXPERTS, block_m_for(ids.numel(), N_EXPERTS))
    act = grouped_gemm(x, w13, align, top_k=TOP_K, gated=True)
    out = grouped_gemm(act, w2, align, top_k=1, gated=False)
    kw = dict(
        top_k=TOP_K, n_group=cfg.n_group, topk_group=cfg.topk_group, scoring_func=cfg.scoring_func,
        topk_method=cfg.topk_method, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
    )  # fmt: skip
    pairs = {
        "routing": (lambda: grouped_topk(logits, bias, **kw), lambda: grouped_topk_ref(logits, bias, **kw)),
        "align": (
            lambda: moe_align(ids, N_EXPERTS, align.block_m),
            lambda: moe_align_ref(ids, N_EXPERTS, align.block_m),
        ),
        "gate/up GEMM": (
            lambda: grouped_gemm(x, w13, align, top_k=TOP_K, gated=True),
            lambda: grouped_gemm_ref(x, w13, align, top_k=TOP_K, gated=True),
        ),
        "down GEMM": (
            lambda: grouped_gemm(act, w2, align, top_k=1, gated=False),
            lambda: grouped_gemm_ref(act, w2, align, top_k=1, gated=False),
        ),
        "combine": (lambda: moe_combine(out, weights), lambda: moe_combine_ref(out, weights)),
        "experts": (
            lambda: fused_experts(x, w13, w2, weights, ids),
            lambda: fused_experts_ref(x, w13, w2, weights, ids),
        ),
        "MoE layer": (_moe_layer(moe, x, "triton"), _moe_layer(moe, x, "torch")),
    }
    return pairs, ids


@torch.no_grad()
def bench_tokens(moe, t: int, peak_gbps: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, HIDDEN, device="cuda", generator=gen).to(moe.experts.w13.dtype)
    pairs, ids = _pairs(moe, x)
    kernel, ref = pairs["experts"]
    max_diff = (kernel().float() - ref().float()).abs().max().item()
    itemsize = moe.experts.w13.element_size()
    touched = int(ids.unique().numel())
    expert_bytes = touched * (moe.experts.w13[0].numel() + moe.experts.w2[0].numel()) * itemsize
    shared = moe.shared_experts
    shared_bytes = sum(p.numel() * p.element_size() for p in shared.parameters()) if shared else 0
    router_bytes = moe.gate.weight.numel() * moe.gate.weight.element_size()
    read_bytes = {"experts": expert_bytes, "MoE layer": expert_bytes + shared_bytes + router_bytes}
    rows = []
    for op, (kernel, ref) in pairs.items():
        row = {"T": t, "op": op, "triton_s": _bench(kernel), "torch_s": _bench(ref)}
        row["speedup"] = row["torch_s"] / row["triton_s"]
        if op in read_bytes:
            row.update(weight_bytes=read_bytes[op], experts_touched=touched)
            row["gbps"] = read_bytes[op] / row["triton_s"] / 1e9
            row["peak_fraction"] = row["gbps"] / peak_gbps
        if op == "experts":
            row["max_abs_diff"] = max_diff
        rows.append(row)
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 4096])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peak-gbps", type=float, default=3350.0, help="peak memory bandwidth, GB/s")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_moe: no CUDA device (or TRITON_INTERPRET=1): MoE kernel timings NOT measured.")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    moe = _release_moe(getattr(torch, args.dtype))
    shape = f"E={N_EXPERTS} K={TOP_K} H={HIDDEN} I={WIDTH}"
    print(f"device {torch.cuda.get_device_name()}, dtype {args.dtype}, {shape}")
    rows = [row for t in args.tokens for row in bench_tokens(moe, t, args.peak_gbps)]
    print("| T | op | triton µs | torch µs | speedup | weights read | GB/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bw = (
            f"{r['weight_bytes'] / 1e6:.1f} MB ({r['experts_touched']} experts) | {r['gbps']:.0f} | "
            f"{r['peak_fraction']:.0%}"
            if "gbps" in r and r["T"] <= 64
            else " | | "
        )
        print(
            f"| {r['T']} | {r['op']} | {r['triton_s'] * 1e6:.1f} | {r['torch_s'] * 1e6:.1f} | "
            f"{r['speedup']:.2f}x | {bw} |"
        )
    for r in rows:
        if "max_abs_diff" in r:
            print(f"T={r['T']}: max |fused_experts - fused_experts_ref| = {r['max_abs_diff']:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
