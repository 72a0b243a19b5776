"""The decoder's dense projections with their weights prepacked for oneDNN: a CPU transform
applied to a loaded model (as expert sharding is), not woven into the layers.

Decode multiplies a few activation rows by every weight matrix. For 2-16 rows, MKL's GEMM behind
`F.linear` re-lays the weights out on every call and reads them at a third to a half of the rate a
plain read gets; a weight laid out once for oneDNN (`mkldnn._reorder_linear_weight`) and used by
`mkldnn._linear_pointwise` reads at close to it (BENCHMARKS.md, "Dense projections"). For one row
MKL's GEMV (bf16: `torch.mv`) is the faster, so the original weight is kept for that case: the
dense projections' weights are held twice (for the release, about 1B parameters of its 16B).

Left as they are: `kv_b_proj` (the absorbed decode reads its weight directly), an `lm_head` tied
to the embeddings, the router (fp32, tiny) and the routed experts (one grouped GEMM per
projection, `fused_experts_grouped`). Knows nothing about engines or serving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KEEP = ("kv_b_proj",)  # modules whose `.weight` other code reads
BATCH_HINT = 16  # the row count oneDNN lays the weights out for (decode batches)


def can_prepack(model: nn.Module) -> bool:
    """CPU weights in fp32 or bf16, and a torch with oneDNN."""
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # torch: untyped
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


# An opaque operator, so a captured decode step (torch.compile) calls oneDNN as it is rather than
# asking inductor to lower it (which it cannot do for every input layout).
@torch.library.custom_op("kimi_vl::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [..., in] -> [..., out_features] with a weight from `mkldnn._reorder_linear_weight`."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
    return out


@packed_linear.register_fake
def _(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` for a single row x [..., in] (numel == in) by the fastest kernel for its dtype:
    in bf16 `torch.mv` over the [out, in] weight (a GEMV that streams the rows with fp32
    accumulation: 25-27 GB/s where `F.linear` reads 17-22, BENCHMARKS.md), else MKL's GEMV."""
    if weight.dtype != torch.bfloat16:
        return F.linear(x, weight, bias)
    out = torch.mv(weight, x.reshape(-1))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class PrepackedLinear(nn.Module):
    """`nn.Linear`'s forward, over a oneDNN-packed copy of the weight for more than one row:
    x [..., in] -> [..., out], same dtype."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # one row: MKL's GEMV
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            return one_row_linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # traced: the opaque operator
            traced: torch.Tensor = packed_linear(x, self.packed_weight, self.bias, self.out_features)
            return traced
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed_weight, self.bias, "none", [], ""
        )
        return out  # eager: oneDNN directly (a custom op's dispatch costs ~50 us a call)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def prepack_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> int:
    """Replace every eligible `nn.Linear` of `model` in place; returns how many were replaced."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = embed.weight if isinstance(embed, nn.Embedding) else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] not in KEEP
        and module.weight is not tied
        and module.weight.device.type == "cpu"
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PrepackedLinear(module, batch_hint))
    return len(targets)
