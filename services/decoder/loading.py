"""The decoder's weights from an official checkpoint: the whole `language_model`, or one
expert-parallel rank's share of it (each MoE layer built sharded, so the rank reads only its
experts from disk). Knows nothing about engines or serving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.config import KimiVLConfig
from services.common.weights import LoadStats, build_and_load
from services.decoder.expert_parallel.sharding import EPContext, shard_experts
from services.decoder.model.decoder import DecoderForCausalLM


def load_text_model(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    progress: bool = False,
    ep: EPContext | None = None,
    stats: LoadStats | None = None,
) -> DecoderForCausalLM:
    """The decoder (`language_model.*` weights) of a Kimi-VL checkpoint. With `ep`, this rank's
    share of it: every MoE layer holds (and reads from disk) only the rank's routed experts."""

    def build(cfg: KimiVLConfig) -> DecoderForCausalLM:
        model = DecoderForCausalLM(cfg.text_config)
        if ep is None:
            return model
        return shard_experts(model, ep)

    return build_and_load(
        build, checkpoint_dir, dtype, device, prefix="language_model.", progress=progress, stats=stats
    )
