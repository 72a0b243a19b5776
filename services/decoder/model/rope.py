"""Rotary position embedding for MLA's rope dims: plain RoPE and DeepSeek YaRN.

The cos/sin tables are derived data, not weights: they are computed on first use for each
(device, dtype), grown as longer positions arrive, and never stored in a module's state, so a
model built on the meta device and filled from a checkpoint needs nothing else. Knows nothing
about attention or caches.

Layout: DeepSeek checkpoints expect the rope dims of q_pe / k_pe in interleaved pairs
(x0, x1), (x2, x3) ...; `apply_rope` de-interleaves them (even indices, then odd) and applies
the rotate-half rotation with cos/sin of [freqs, freqs]. Its output stays de-interleaved; q and
k are permuted alike, so their dot products are unchanged.
"""

from __future__ import annotations

import math

import torch

from services.common.config import RopeScaling, TextConfig, yarn_mscale

_MIN_TABLE = 4096  # first table length; doubled as longer positions arrive


def _arange(start: int, end: int, step: int) -> torch.Tensor:
    # explicit device and dtype: models are built under torch.device("meta") and a bf16 default
    return torch.arange(start, end, step, dtype=torch.float32, device="cpu")


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2j/dim) for j in [0, dim/2), float32 [dim/2]."""
    return 1.0 / (theta ** (_arange(0, dim, 2) / dim))


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, max_pos: int) -> float:
    """The (fractional) rope dim whose wavelength makes `num_rotations` turns over `max_pos`."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(dim: int, theta: float, rs: RopeScaling) -> torch.Tensor:
    """DeepSeek YaRN: high-frequency dims extrapolate, low-frequency dims interpolate by `factor`,
    with a linear ramp between the dims turning beta_fast and beta_slow times over the original
    context. float32 [dim/2]."""
    low = math.floor(_yarn_correction_dim(rs.beta_fast, dim, theta, rs.original_max_position_embeddings))
    high: float = math.ceil(
        _yarn_correction_dim(rs.beta_slow, dim, theta, rs.original_max_position_embeddings)
    )
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp
    ramp = ((_arange(0, dim // 2, 1) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: divide it by the factor
    freq_extra = default_inv_freq(dim, theta)
    freq_inter = 1.0 / (rs.factor * theta ** (_arange(0, dim, 2) / dim))
    return freq_inter * (1 - extrapolate) + freq_extra * extrapolate


class RotaryEmbedding:
    """cos/sin lookup for MLA's `qk_rope_head_dim` dims. Not an nn.Module: it holds no weights."""

    def __init__(self, cfg: TextConfig) -> None:
        self.dim = cfg.qk_rope_head_dim
        rs = cfg.rope_scaling
        if rs is None:
            self.inv_freq = default_inv_freq(self.dim, cfg.rope_theta)
            self.magnitude = 1.0
        else:
            self.inv_freq = yarn_inv_freq(self.dim, cfg.rope_theta, rs)
            self.magnitude = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < n:
            length = max(_MIN_TABLE, 1 << (n - 1).bit_length())
            pos = torch.arange(length, dtype=torch.float32, device=device)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]  # [P, D/2] fp32
            emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
            # fp32 trig, then one cast: the same rounding as the reference implementations
            cached = ((emb.cos() * self.magnitude).to(dtype), (emb.sin() * self.magnitude).to(dtype))
            self._tables[key] = cached
        return cached

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype, max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] in `dtype` for `positions` [T] (int64).

        `max_len` (> every position), when the caller knows it, spares a device->host sync.
        """
        if max_len is None:
            max_len = int(positions.max()) + 1 if positions.numel() else 1
        n = max_len
        cos, sin = self._table(n, positions.device, dtype)
        return cos[positions], sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved-layout rope dims. x [T, ..., D]; cos/sin [T, D] -> [T, ..., D] de-interleaved."""
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)  # even dims, then odd
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    return x * cos.view(shape) + rotated * sin.view(shape)
