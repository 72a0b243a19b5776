"""Multi-head Latent Attention (DeepSeek-V2/V3 MLA) over the paged latent cache.

Per token the layer writes one latent of `latent_dim` = kv_lora_rank + qk_rope_head_dim values
(normalised compressed kv, rotated k_pe) into the cache, then attends in one of two forms that
compute the same function:
- prefill (expanded): kv_b_proj turns each cached latent into per-head k_nope / v; causal
  attention of the new tokens over the sequence's whole context (earlier cached tokens too),
  a segment of it at a time, so memory stays bounded at any context length;
- decode (absorbed, one new token per sequence): the key half of kv_b_proj is folded into
  q_nope and the value half into the output, so attention runs against the latents directly
  (on CUDA in the Triton kernel `triton_kernels.paged_mla`, which walks the block table; else a
  segment of a long context at a time).

Also home of `RMSNorm`, which the decoder layers share. Knows nothing about the MLP, the
scheduler or where blocks come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.config import TextConfig
from services.decoder.model.kv_cache import AttentionMetadata, PagedKVCache
from services.decoder.model.paged_attention import SEGMENT_TOKENS, decode_attention, prefill_attention
from services.decoder.model.rope import apply_rope
from triton_kernels import paged_mla_decode, use_kernels

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
        q_rank = cfg.q_lora_rank
        self.q_lora = q_rank is not None
        if q_rank is None:
            self.q_proj = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, q_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=bias)
        # derived from kv_b_proj for the absorbed decode; not state (see `_absorbed_weights`)
        self._absorbed: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None
        # keys attended at once over a long context (rounded to whole blocks); tests shrink it
        self.segment_tokens = SEGMENT_TOKENS

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        """x [T, H]; rope = (cos, sin) [T, rope_dim] of the tokens' positions -> [T, H]."""
        q = self._query(x).view(x.shape[0], self.num_heads, -1)  # [T, nH, nope+rope]
        q_nope, q_pe = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope)  # [T, nH, rope]
        latents = torch.cat([self.kv_a_layernorm(c_kv), apply_rope(k_pe, *rope)], dim=-1)  # [T, D]
        kv_cache.write(self.layer_idx, attn.slot_mapping, latents)
        # a mixed step: decodes (first d rows, one per sequence) absorbed, prefill chunks expanded
        d = attn.num_decodes
        if d == attn.num_seqs:
            out = self._decode_absorbed(q_nope, q_pe, attn, kv_cache)
        elif d == 0:
            out = self._prefill_expanded(q_nope, q_pe, attn, kv_cache, first_seq=0)
        else:
            out = torch.cat(
                [
                    self._decode_absorbed(q_nope[:d], q_pe[:d], attn, kv_cache, num_seqs=d),
                    self._prefill_expanded(q_nope[d:], q_pe[d:], attn, kv_cache, first_seq=d),
                ]
            )
        projected: torch.Tensor = self.o_proj(out.flatten(1))  # [T, nH·v] -> [T, H]
        return projected

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        q: torch.Tensor = (
            self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        )
        return q

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's halves in the layouts the decode matmuls read: W_uk [nH, nope, R] and
        W_uv transposed [nH, R, v], contiguous. Made once per weight version (slicing the weight
        per step made every decode step copy both, ~45% of a step at the release's sizes).

        On CPU they are kept in fp32: without AVX512-BF16 a bf16 `bmm` takes a slow fallback
        kernel (measured 6x fp32's time at batch 1, 20x at batch 8), and bf16 -> fp32 is exact.
        Traced code (torch.compile) cannot read `data_ptr` / `_version`: there the copies made
        before capture are used as they are (`DecodeRunner` makes them).
        """
        if self._absorbed is not None and torch.compiler.is_compiling():
            return self._absorbed[1], self._absorbed[2]
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._absorbed is None or self._absorbed[0] != key:
            w3 = w.detach().view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            dtype = torch.float32 if w.device.type == "cpu" else w.dtype
            w_uk = w3[:, : self.nope_dim].to(dtype).contiguous()
            w_uv_t = w3[:, self.nope_dim :].transpose(1, 2).to(dtype).contiguous()
            self._absorbed = (key, w_uk, w_uv_t)
        return self._absorbed[1], self._absorbed[2]

    def _prefill_expanded(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
        first_seq: int,
    ) -> torch.Tensor:
        """Causal attention of the new tokens of sequences first_seq.. over their full context.

        q_nope / q_pe hold those sequences' rows only. -> [T', nH, v]. The context is read and
        decompressed a segment at a time (`paged_attention.prefill_attention`): memory does not
        grow with its length."""
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T', nH, nope+rope]
        outs = []
        start = 0
        seqs = zip(attn.query_lens[first_seq:], attn.context_lens[first_seq:], strict=True)
        for b, (q_len, ctx) in enumerate(seqs, start=first_seq):
            table = attn.block_tables[b : b + 1]

            def read_kv(lo: int, hi: int, table: torch.Tensor = table) -> tuple[torch.Tensor, torch.Tensor]:
                return self._expand(kv_cache.read(self.layer_idx, table, lo, hi)[0].to(q.dtype))

            rows = q[start : start + q_len].transpose(0, 1)  # [nH, Tq, d]
            out = prefill_attention(rows, read_kv, ctx - q_len, self.scale, self.segment_len(attn.block_size))
            outs.append(out.transpose(0, 1).to(q.dtype))
            start += q_len
        return torch.cat(outs, dim=0)

    def _expand(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latents [S, D] -> per-head keys [nH, S, nope+rope] and values [nH, S, v]."""
        c_kv, k_pe = torch.split(latents, [self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(latents.shape[0], self.num_heads, -1)  # [S, nH, nope+v]
        k_nope, v = torch.split(kv, [self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        return k.transpose(0, 1), v.transpose(0, 1)

    def segment_len(self, block_size: int) -> int:
        """Keys per attention segment: `segment_tokens` rounded down to whole blocks."""
        return max(1, self.segment_tokens // block_size) * block_size

    def decodes_in_segments(self, tables: torch.Tensor, block_size: int, x: torch.Tensor) -> bool:
        """Whether a decode over block tables [B, M] loops over segments of the context (a loop a
        captured step cannot hold); never where the Triton kernel (chosen by x) takes the decode."""
        return not use_kernels(x) and tables.shape[1] * block_size > self.segment_len(block_size)

    def _decode_absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
        num_seqs: int | None = None,
    ) -> torch.Tensor:
        """One query for each of the first `num_seqs` sequences (default all), in latent space.

        -> [B, nH, v]."""
        tables, context_lens = attn.block_tables, attn.context_lens_tensor
        if num_seqs is not None:
            # only as many blocks as the longest decode holds: a long prefill chunk in the same
            # step must not make every decode read its context width
            width = -(-max(attn.context_lens[:num_seqs]) // attn.block_size)
            tables, context_lens = tables[:num_seqs, :width], context_lens[:num_seqs]
        w_uk, w_uv_t = self._absorbed_weights()
        dtype = q_pe.dtype
        # [nH, B, nope] @ [nH, nope, R] -> [nH, B, R]
        q_lat = torch.bmm(q_nope.transpose(0, 1).to(w_uk.dtype), w_uk).to(dtype)
        q_abs = torch.cat([q_lat.transpose(0, 1), q_pe], dim=-1)  # [B, nH, D]: against [c_kv | k_pe]
        # read whole blocks (C = table width × block size, the tail masked): the shape then changes
        # once per block, not per step — each new shape costs a fresh oneDNN kernel on CPU
        length = tables.shape[1] * attn.block_size
        if use_kernels(q_abs):
            # the Triton kernel walks the block table itself: no gather, any length
            o = paged_mla_decode(
                q_abs, kv_cache.data[self.layer_idx], tables, context_lens, self.scale, self.kv_lora_rank
            )  # [B, nH, R] fp32
            o_lat = o.transpose(0, 1)
        elif self.decodes_in_segments(tables, attn.block_size, q_abs):
            # a long context: a segment of latents at a time (what captured steps never see)
            def read_kv(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
                latents = kv_cache.read(self.layer_idx, tables, lo, hi).to(dtype)
                return latents, latents

            o = decode_attention(q_abs, read_kv, context_lens, self.scale, self.segment_len(attn.block_size))
            o_lat = o[:, :, : self.kv_lora_rank].transpose(0, 1)  # [nH, B, R]
        else:
            latents = kv_cache.gather(self.layer_idx, tables, length).to(dtype)[:, None]  # [B, 1, C, D]
            mask = torch.arange(length, device=latents.device) < context_lens[:, None]  # [B, C]
            # one kv head (the latents) shared by all query heads: the nH heads are the query rows
            # of one SDPA head; the latents serve as values too (the output's rope dims are dropped)
            o = F.scaled_dot_product_attention(
                q_abs[:, None], latents, latents, attn_mask=mask[:, None, None, :], scale=self.scale
            )  # [B, 1, nH, D]
            o_lat = o[:, 0, :, : self.kv_lora_rank].transpose(0, 1)  # [nH, B, R]
        return torch.bmm(o_lat.to(w_uv_t.dtype), w_uv_t).to(dtype).transpose(0, 1)  # [B, nH, v]
