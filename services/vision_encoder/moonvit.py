"""MoonViT, Kimi-VL's native-resolution vision tower, and the multimodal projector (spec section 2).

Module attribute names equal the checkpoint keys once `vision_tower.` / `multi_modal_projector.`
is stripped. The only parameters are checkpoint weights; nothing is computed in `__init__` that
must survive, so the modules can be built on the `meta` device and filled from a checkpoint.

Shapes: P patches (all images packed, in order), T merged tokens, K = kernel area (4),
H vision hidden, D head dim.

Knows nothing about image decoding, tokenization or the language model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.common.config import VisionConfig
from services.common.errors import InvalidInputError
from services.vision_encoder.attention import PackedSeqs, packed_attention
from services.vision_encoder.rope2d import ROPE_MAX_GRID, apply_rope, rope_cis

LAYER_NORM_EPS = 1e-5

Grid = tuple[int, int]


class PosEmb2D(nn.Module):
    """Learnable [H0, W0, H] position table, bicubic-resized to each image's patch grid."""

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def for_grid(self, grid: Grid) -> torch.Tensor:
        """[h·w, H], row-major. The table's own size is used as is (bicubic at scale 1 is the identity)."""
        if grid == tuple(self.weight.shape[:2]):
            return self.weight.flatten(0, 1)
        picture = self.weight.permute(2, 0, 1).unsqueeze(0)  # [1, H, H0, W0]
        resized = F.interpolate(picture, size=grid, mode="bicubic", align_corners=False, antialias=False)
        return resized.squeeze(0).permute(1, 2, 0).flatten(0, 1)

    def forward(self, grids: Sequence[Grid]) -> torch.Tensor:
        """[P, H] for all grids in order (each distinct grid interpolated once)."""
        if not grids:
            return self.weight.new_empty((0, self.weight.shape[-1]))
        per_grid = {grid: self.for_grid(grid) for grid in dict.fromkeys(grids)}
        return torch.cat([per_grid[grid] for grid in grids])


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = PosEmb2D(cfg.init_pos_emb_height, cfg.init_pos_emb_width, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """pixel_values [P, 3, p, p] → [P, H]."""
        weight = self.proj.weight  # [H, 3, p, p]
        # A convolution whose kernel and stride cover the whole input is one matmul per patch.
        x = F.linear(pixel_values.to(weight.dtype).flatten(1), weight.flatten(1), self.proj.bias)
        return x + self.pos_emb(grids)


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(hidden, intermediate)
        self.fc1 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm0(x)); x + mlp(norm1(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.norm0 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.norm1 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.wqkv = nn.Linear(hidden, 3 * hidden)
        self.wo = nn.Linear(hidden, hidden)
        self.mlp = VisionMLP(hidden, cfg.intermediate_size)

    def attention(self, x: torch.Tensor, cis: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        """x [P, H], cis [P, D/2] → [P, H]."""
        qkv = self.wqkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # [P, 3, heads, D]
        q, k, v = qkv.unbind(1)
        q, k = apply_rope(q, cis), apply_rope(k, cis)
        out = packed_attention(q, k, v, seqs, scale=self.head_dim**-0.5)  # [P, heads, D]
        return self.wo(out.flatten(1))

    def forward(self, x: torch.Tensor, cis: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cis, seqs)
        return x + self.mlp(self.norm1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, cis: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cis, seqs)
        return self.final_layernorm(x)


def patch_merger(x: torch.Tensor, grids: Sequence[Grid], kernel: tuple[int, int]) -> torch.Tensor:
    """[P, H] → [T, K, H]: each kh×kw window of an image's grid becomes one token.

    Tokens run row-major over each image's (h/kh, w/kw) window grid, images in order; a token holds
    its window's patches row-major (top-left, top-right, bottom-left, bottom-right for 2×2).
    """
    kh, kw = kernel
    hidden = x.shape[-1]
    tokens = []
    start = 0
    for h, w in grids:
        image = x[start : start + h * w].view(h // kh, kh, w // kw, kw, hidden)
        tokens.append(image.permute(0, 2, 1, 3, 4).reshape(-1, kh * kw, hidden))
        start += h * w
    if not tokens:
        return x.new_empty((0, kh * kw, hidden))
    return torch.cat(tokens)


class MoonViT(nn.Module):
    """The vision tower: packed patches of several images → their merged tokens."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, 3, p, p] (any float dtype), grid_hws [N, 2] (h, w) → [T, K, H].

        The output holds all images' merged tokens concatenated in order: image n contributes
        h_n·w_n / K rows (split with `torch.split(out, num_tokens)`), in the weights' dtype.
        """
        grids = self.check_inputs(pixel_values, grid_hws)
        x = self.patch_embed(pixel_values, grids)  # [P, H]
        cis = rope_cis(grids, self.cfg.head_dim, x.device)  # [P, D/2]
        seqs = PackedSeqs.from_lengths([h * w for h, w in grids], x.device)
        x = self.encoder(x, cis, seqs)
        return patch_merger(x, grids, self.cfg.merge_kernel_size)

    def check_inputs(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[Grid]:
        p, (kh, kw) = self.cfg.patch_size, self.cfg.merge_kernel_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise InvalidInputError(f"pixel_values must be [P, 3, {p}, {p}], got {list(pixel_values.shape)}")
        if grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
            raise InvalidInputError(f"grid_hws must be [N, 2], got {list(grid_hws.shape)}")
        grids = [(int(h), int(w)) for h, w in grid_hws.tolist()]
        for h, w in grids:
            if not (0 < h <= ROPE_MAX_GRID and 0 < w <= ROPE_MAX_GRID) or h % kh or w % kw:
                raise InvalidInputError(
                    f"patch grid {h}x{w} must have sides in [1, {ROPE_MAX_GRID}] divisible by {kh}x{kw}"
                )
        total = sum(h * w for h, w in grids)
        if total != pixel_values.shape[0]:
            raise InvalidInputError(
                f"grid_hws cover {total} patches but pixel_values has {pixel_values.shape[0]}"
            )
        return grids


class MultiModalProjector(nn.Module):
    """[T, K, H] merged vision tokens → [T, text hidden] language-model embeddings."""

    def __init__(self, vision: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        merged = vision.merged_dim
        self.pre_norm = nn.LayerNorm(vision.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, text_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x).flatten(1)  # [T, K·H], each sub-patch normalised on its own
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact (erf) GELU here, tanh in the tower
