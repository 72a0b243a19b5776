"""MoonViT's 2D rotary position embedding (spec section 2), as plain functions.

Each head's `head_dim` values are read as head_dim/2 complex numbers (dims 2j, 2j+1 → number j).
Number j = 2i rotates by the patch's column x times theta^(-4i/head_dim), number j = 2i+1 by its
row y times the same frequency, i in [0, head_dim/4). Angles and rotation are fp32 / complex64;
the rotated values are cast back to the input dtype.

Nothing here is a parameter or a persistent buffer: the per-axis table is a few kilobytes, so it
is rebuilt on each call, on the activations' device, which keeps meta-device construction and
checkpoint loading free of hidden state. The values equal those of a precomputed 512×512 table.

Knows nothing about weights, attention or image preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.errors import InvalidInputError

ROPE_THETA = 10000.0
ROPE_MAX_GRID = 512  # the reference's table covers grids up to 512 × 512 patches


def rope_frequencies(head_dim: int, device: torch.device, theta: float = ROPE_THETA) -> torch.Tensor:
    """[head_dim/4] fp32: theta^(-4i/head_dim), computed as 1 / theta^(4i/head_dim) like the reference."""
    exponents = torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def rope_cis(
    grids: Sequence[tuple[int, int]], head_dim: int, device: torch.device, theta: float = ROPE_THETA
) -> torch.Tensor:
    """[P, head_dim/2] complex64 rotations for all patches of `grids` (row-major per image, in order)."""
    if head_dim % 4:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for the 2D rope")
    if not grids:
        return torch.empty((0, head_dim // 2), dtype=torch.complex64, device=device)
    side = max(max(h, w) for h, w in grids)
    if side > ROPE_MAX_GRID:
        raise InvalidInputError(f"patch grid side {side} exceeds the rotary table ({ROPE_MAX_GRID})")
    positions = torch.arange(side, device=device, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(head_dim, device, theta))  # [side, D/4]
    axis = torch.polar(torch.ones_like(angles), angles)  # [side, D/4] complex64
    per_grid: dict[tuple[int, int], torch.Tensor] = {}
    for h, w in grids:
        if (h, w) not in per_grid:
            x = axis[:w].unsqueeze(0).expand(h, w, -1)  # column index → even numbers
            y = axis[:h].unsqueeze(1).expand(h, w, -1)  # row index → odd numbers
            per_grid[(h, w)] = torch.stack((x, y), dim=-1).reshape(h * w, head_dim // 2)
    return torch.cat([per_grid[grid] for grid in grids])


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate x [P, heads, D] by cis [P, D/2] (complex64) in fp32; returns x's dtype, contiguous."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))  # [P, heads, D/2]
    rotated = torch.view_as_real(pairs * cis.unsqueeze(-2)).flatten(-2)  # [P, heads, D]
    return rotated.to(x.dtype)
