"""The whole Kimi-VL model, as one module tree whose names are the checkpoint's keys.

`KimiVLForConditionalGeneration` holds `vision_tower` (MoonViT), `multi_modal_projector` and
`language_model` (the MoE decoder), so `load_weights` fills it from an official checkpoint with
no key mapping. It only composes the two parts, each defined in its own stage's package; the
services load only the part they run (`services.vision_encoder.model.load_vision_encoder`,
`services.decoder.loading.load_text_model`), and the offline path (`services.offline`) loads all
of it. Knows nothing about tokenizers, images on disk or serving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.config import KimiVLConfig
from services.common.weights import build_and_load
from services.decoder.model.decoder import DecoderForCausalLM
from services.vision_encoder.model import VisionEncoder


class KimiVLForConditionalGeneration(VisionEncoder):
    """Vision encoder + decoder; `language_model` runs through the engine's paged cache."""

    def __init__(self, cfg: KimiVLConfig) -> None:
        super().__init__(cfg)
        self.config = cfg
        self.language_model = DecoderForCausalLM(cfg.text_config)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        return VisionEncoder.forward(self, pixel_values, image_grid_hws)


def load_kimi_vl(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    progress: bool = False,
) -> KimiVLForConditionalGeneration:
    return build_and_load(KimiVLForConditionalGeneration, checkpoint_dir, dtype, device, progress=progress)
