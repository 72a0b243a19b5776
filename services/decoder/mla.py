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
        # one fused kernel for the normalisation (x·rsqrt(mean(x²)+eps)); the weight comes after
        # the cast back, as in the reference, so bf16 rounds at the same place
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


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
        # derived from kv_b_proj for the absorbed decode; not state (see `_absorbed_weights`)
        self._absorbed: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None

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

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's halves in the layouts the decode matmuls read: W_uk [nH, nope, R] and
        W_uv transposed [nH, R, v], contiguous. Made once per weight version (slicing the weight
        per step made every decode step copy both, ~45% of a step at the release's sizes)."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._absorbed is None or self._absorbed[0] != key:
            w3 = w.detach().view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk = w3[:, : self.nope_dim].contiguous()
            w_uv_t = w3[:, self.nope_dim :].transpose(1, 2).contiguous()
            self._absorbed = (key, w_uk, w_uv_t)
        return self._absorbed[1], self._absorbed[2]

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
        w_uk, w_uv_t = self._absorbed_weights()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [nH, B, nope] @ [nH, nope, R] -> [nH, B, R]
        q_abs = torch.cat([q_lat.transpose(0, 1), q_pe], dim=-1)  # [B, nH, D]: against [c_kv | k_pe]
        # read whole blocks (C = table width × block size, the tail masked): the shape then changes
        # once per block, not per step — each new shape costs a fresh oneDNN kernel on CPU
        length = attn.block_tables.shape[1] * attn.block_size
        latents = kv_cache.gather(self.layer_idx, attn.block_tables, length).to(q_abs.dtype)  # [B, C, D]
        pos = torch.arange(length, device=latents.device)
        mask = pos[None, :] < attn.context_lens_tensor[:, None]  # [B, C]
        # latents stay the row-major operand: a transposed bf16 operand takes a slow path on CPU
        scores = torch.bmm(latents, q_abs.transpose(1, 2)).transpose(1, 2) * self.scale  # [B, nH, C]
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_abs.dtype)  # [B, nH, C]
        o_lat = torch.bmm(probs, latents[..., : self.kv_lora_rank])  # [B, nH, R]
        return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [nH, B, v] -> [B, nH, v]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [Tq, nH, d], k [C, nH, d], v [C, nH, dv], mask [Tq, C] (True = attend) -> [Tq, nH, dv]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)
