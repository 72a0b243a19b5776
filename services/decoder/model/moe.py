"""The DeepSeek-V3 MoE layer: a fp32 router, fused routed experts and a dense shared expert.

Routed experts are stored fused (`experts.w13` [E, 2·I, H] = gate rows then up rows, `experts.w2`
[E, H, I]) for the grouped-GEMM kernels; the checkpoint keeps one module per expert, so `FusedExperts`
speaks the loader's custom-load protocol (`checkpoint_keys` / `load_checkpoint_tensor`).
Routing (`select_experts`) and the routed experts (`FusedExperts.forward`) are each one dispatch
point: the Triton kernels on CUDA tensors, their PyTorch references elsewhere, either forced by
KIMI_VL_MOE_BACKEND (see `triton_kernels._backend`). Knows nothing about attention, caches or
parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.config import TextConfig
from services.common.errors import CheckpointError
from triton_kernels import fused_experts, fused_experts_grouped, grouped_topk, grouped_topk_ref, use_kernels


class MLP(nn.Module):
    """down(silu(gate(x)) · up(x)): the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


def select_experts(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, cfg: TextConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] fp32 -> (topk_weights [T, K] fp32, topk_ids [T, K] int32)."""
    route = grouped_topk if use_kernels(router_logits) else grouped_topk_ref
    return route(
        router_logits,
        correction_bias,
        top_k=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        scoring_func=cfg.scoring_func,
        topk_method=cfg.topk_method,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
    )


class MoEGate(nn.Module):
    """Router weights, fp32 whatever the model dtype (spec section 3: gate math is fp32)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        e, h = cfg.n_routed_experts, cfg.hidden_size
        self.weight = nn.Parameter(torch.empty(e, h, dtype=torch.float32))
        # only noaux_tc checkpoints carry the bias (as in the reference MoEGate)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(e, dtype=torch.float32), requires_grad=False
            )
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E] fp32."""
        return F.linear(x.float(), self.weight.float())


# The CPU path's groups depend on the routing itself: traced by torch.compile they would specialise
# the graph on it (a recompile per step) or split it at every MoE layer. As a custom op it is one
# opaque node of a captured step.
@torch.library.custom_op("kimi_vl::fused_experts_grouped", mutates_args=())
def fused_experts_cpu_op(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """`fused_experts_grouped` as an operator: x [T, H], topk_weights/ids [T, K] (fp32/int) -> [T, H]."""
    return fused_experts_grouped(x, w13, w2, topk_weights, topk_ids)


@fused_experts_cpu_op.register_fake
def _(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class FusedExperts(nn.Module):
    """E routed experts in two fused tensors; computes Σ_k w[t,k] · expert_{ids[t,k]}(x[t])."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def checkpoint_keys(self) -> list[str]:
        """The official per-expert keys, relative to `mlp.experts.`."""
        projs = ("gate_proj", "up_proj", "down_proj")
        return [f"{e}.{p}.weight" for e in range(self.num_experts) for p in projs]

    def _slot(self, name: str) -> torch.Tensor:
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] != "weight":
            raise CheckpointError(f"unexpected expert key {name!r}")
        e, proj, i = int(parts[0]), parts[1], self.intermediate_size
        if not 0 <= e < self.num_experts:
            raise CheckpointError(f"expert key {name!r}: expert {e} out of range [0, {self.num_experts})")
        slots = {"gate_proj": self.w13[e, :i], "up_proj": self.w13[e, i:], "down_proj": self.w2[e]}
        if proj not in slots:
            raise CheckpointError(f"unexpected expert key {name!r}")
        return slots[proj]

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one per-expert checkpoint tensor (e.g. `3.up_proj.weight`) into its fused slice."""
        slot = self._slot(name)
        if tuple(tensor.shape) != tuple(slot.shape):
            raise CheckpointError(
                f"expert key {name!r} has shape {list(tensor.shape)}, expected {list(slot.shape)}"
            )
        with torch.no_grad():
            slot.copy_(tensor)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights [T, K] fp32, topk_ids [T, K] int32 -> [T, H].

        The weighted sum is accumulated in fp32 and cast once on both paths.
        """
        run = fused_experts if use_kernels(x) else fused_experts_cpu_op
        return run(x, self.w13, self.w2, topk_weights, topk_ids)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = MoEGate(cfg)
        self.experts = FusedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared) if shared > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        # route → experts → combine: x ─gate→ [T,E] ─select_experts→ w,ids [T,K] ─experts→ Σ w·E(x) +shared(x)
        topk_weights, topk_ids = select_experts(self.gate(x), self.gate.e_score_correction_bias, self.cfg)
        out: torch.Tensor = self.experts(x, topk_weights, topk_ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)
