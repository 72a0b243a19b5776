"""The Kimi-VL language model: a DeepSeek-V3-architecture MoE decoder over a paged MLA cache.

Parameter names equal the checkpoint keys after the `language_model.` prefix
(`model.layers.1.mlp.gate.e_score_correction_bias`, `lm_head.weight`), so the generic loader
fills a model built on the meta device. Tokens arrive flattened across sequences (varlen, like
vLLM / nano-vllm); where they go in the cache and what they attend to comes from the
`AttentionMetadata` the engine passes in. Knows nothing about tokenizers, images, sampling or
scheduling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from services.common.config import TextConfig
from services.decoder.model.kv_cache import AttentionMetadata, PagedKVCache
from services.decoder.model.mla import MLAttention, RMSNorm
from services.decoder.model.moe import MLP, MoE
from services.decoder.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        """h [T, H] -> [T, H]."""
        h = h + self.self_attn(self.input_layernorm(h), rope, attn, kv_cache)
        mlp_out: torch.Tensor = self.mlp(self.post_attention_layernorm(h))
        return h + mlp_out


class DecoderModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)  # derived tables, not state

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Input embeddings h [T, H] at positions [T] -> final-normed hidden states [T, H].

        `rope` = (cos, sin) [T, rope] of `positions` when the caller made them: a captured decode
        step looks them up outside the graph, where the table may grow.
        """
        if rope is None:
            rope = self.rotary(positions, h.dtype, max_len=attn.max_context_len)
        for layer in self.layers:
            h = layer(h, rope, attn, kv_cache)
        out: torch.Tensor = self.norm(h)
        return out


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._tie()

    def _tie(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DecoderForCausalLM:
        # `to_empty` / device moves make new Parameters one by one, which unties shared ones
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch: Module._apply is unannotated
        self._tie()
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, H]."""
        embeds: torch.Tensor = self.model.embed_tokens(input_ids)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: PagedKVCache,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, H]), positions [T] -> hidden [T, H].

        Writes the tokens' latents into `kv_cache` at `attn.slot_mapping` in every layer.
        """
        if input_ids is not None and inputs_embeds is None:
            h = self.embed(input_ids)
        elif input_ids is None and inputs_embeds is not None:
            h = inputs_embeds
        else:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden: torch.Tensor = self.model(h, positions, attn, kv_cache)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> logits [T, V] float32."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits.float()
