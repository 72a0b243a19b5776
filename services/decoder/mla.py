"""Multi-head Latent Attention (DeepSeek-V2/V3 MLA) over the paged latent cache.

Per token the layer writes one latent of `latent_dim` = kv_lora_rank + qk_rope_head_dim values
(normalised compressed kv, rotated k_pe) into the cache, then attends in one of two forms that
compute the same function:
- prefill (expanded): kv_b_proj turns each cached latent into per-head k_nope / v; causal
  attention of the new tokens over the sequence's whole context (earlier cached tokens too);
- decode (absorbed, one new token per sequence): the key half of kv_b_proj is folded into
  q_nope and the value half into the output, so attention runs against the latents directly.

Also home of `RMSNorm`, which the decoder layers share. Knows nothing about the MLP, the
scheduler or where blocks come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.config import TextConfig
from services.decoder.kv_cache import AttentionMetadata, PagedKVCache
from services.decoder.rope import apply_rope

# The reference (official Kimi-VL / DeepSeek-V3 remote code, and transformers) builds
# q_a_layernorm and kv_a_layernorm with the RMSNorm default eps, not `rms_norm_eps`.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back to the input dtype, then × weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        h, nh, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        self.q_lora = cfg.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        """x [T, H]; rope = (cos, sin) [T, rope_dim] of the tokens' positions -> [T, H]."""
        q = self._query(x).view(x.shape[0], self.num_heads, -1)  # [T, nH, nope+rope]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope)  # [T, nH, rope]
        latents = torch.cat([self.kv_a_layernorm(c_kv), apply_rope(k_pe, *rope)], dim=-1)  # [T, D]
        kv_cache.write(self.layer_idx, attn.slot_mapping, latents)
        if attn.is_decode:
            out = self._decode_absorbed(q_nope, q_pe, attn, kv_cache)
        else:
            out = self._prefill_expanded(q_nope, q_pe, attn, kv_cache)
        return self.o_proj(out.flatten(1))  # [T, nH·v] -> [T, H]

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if not self.q_lora:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _kv_b_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight split per head: W_uk [nH, nope, R], W_uv [nH, v, R]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _prefill_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, attn: AttentionMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its full context. -> [T, nH, v]."""
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, nH, nope+rope]
        outs = []
        start = 0
        for b, (q_len, ctx) in enumerate(zip(attn.query_lens, attn.context_lens, strict=True)):
            latents = kv_cache.gather(self.layer_idx, attn.block_tables[b : b + 1], ctx)[0]  # [C, D]
            latents = latents.to(q.dtype)
            c_kv, k_pe = latents.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            kv = self.kv_b_proj(c_kv).view(ctx, self.num_heads, -1)  # [C, nH, nope+v]
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
            # query i sits at position ctx - q_len + i and sees keys 0 ..= that position
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [Tq, C]
            outs.append(_attend(q[start : start + q_len], k, v, mask, self.scale))
            start += q_len
        return torch.cat(outs, dim=0)

    def _decode_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, attn: AttentionMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        """One query per sequence, attention in latent space. -> [B, nH, v]."""
        w_uk, w_uv = self._kv_b_halves()
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)  # [B, nH, R]
        q_abs = torch.cat([q_lat, q_pe], dim=-1)  # [B, nH, D]: scored against [c_kv | k_pe]
        latents = kv_cache.gather(self.layer_idx, attn.block_tables, attn.max_context_len)  # [B, C, D]
        latents = latents.to(q_abs.dtype)
        pos = torch.arange(latents.shape[1], device=latents.device)
        mask = pos[None, :] < attn.context_lens_tensor[:, None]  # [B, C]
        scores = torch.einsum("bhd,bcd->bhc", q_abs, latents) * self.scale
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_abs.dtype)  # [B, nH, C]
        o_lat = torch.einsum("bhc,bcr->bhr", probs, latents[..., : self.kv_lora_rank])  # [B, nH, R]
        return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)  # [B, nH, v]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [Tq, nH, d], k [C, nH, d], v [C, nH, dv], mask [Tq, C] (True = attend) -> [Tq, nH, dv]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)
