"""Triton kernels, each beside its PyTorch reference (`op` / `op_ref`). The MoE layer:

    router logits ─grouped_topk→ (weights, ids) ─moe_align→ expert blocks
        ─grouped_gemm(w13, SiLU·up)→ ─grouped_gemm(w2)→ ─moe_combine→ [T, H]

`fused_experts` chains the last four. MLA's decode: `paged_mla_decode` attends in latent space
over the paged cache. `use_kernels` is the one switch (KIMI_VL_MOE_BACKEND) between the two
paths; see `_backend`.
"""

from triton_kernels._backend import BACKEND_ENV, BACKENDS, HAVE_TRITON, moe_backend, use_kernels
from triton_kernels.align import MoEAlignment, moe_align, moe_align_ref
from triton_kernels.combine import moe_combine, moe_combine_ref
from triton_kernels.fused_experts import (
    fused_experts,
    fused_experts_grouped,
    fused_experts_ref,
    grouped_gemm,
    grouped_gemm_ref,
)
from triton_kernels.paged_mla import paged_mla_decode, paged_mla_decode_ref
from triton_kernels.routing import grouped_topk, grouped_topk_ref

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "HAVE_TRITON",
    "MoEAlignment",
    "fused_experts",
    "fused_experts_grouped",
    "fused_experts_ref",
    "grouped_gemm",
    "paged_mla_decode",
    "paged_mla_decode_ref",
    "grouped_gemm_ref",
    "grouped_topk",
    "grouped_topk_ref",
    "moe_align",
    "moe_align_ref",
    "moe_backend",
    "moe_combine",
    "moe_combine_ref",
    "use_kernels",
]
