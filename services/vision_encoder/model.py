"""MoonViT followed by the projector, as the vision encoder replica runs it: packed patches in,
text-width embeddings out, loaded from the `vision_tower.*` and `multi_modal_projector.*` keys of an
official checkpoint (the decoder's keys are skipped, never read). Knows nothing about the decoder,
caches or serving.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.common.config import KimiVLConfig
from services.common.weights import build_and_load
from services.vision_encoder.moonvit import MoonViT, MultiModalProjector

VISION_SCOPE = ("vision_tower.", "multi_modal_projector.")


class VisionEncoder(nn.Module):
    """MoonViT followed by the projector: packed patches in, text-width embeddings out."""

    def __init__(self, cfg: KimiVLConfig) -> None:
        super().__init__()
        self.vision_tower = MoonViT(cfg.vision_config)
        self.multi_modal_projector = MultiModalProjector(cfg.vision_config, cfg.text_config.hidden_size)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, 3, p, p], image_grid_hws [N, 2] -> embeddings [Σ h·w/4, H_text]."""
        dtype = next(self.parameters()).dtype
        merged = self.vision_tower(pixel_values.to(dtype), image_grid_hws)  # [T, 4, H_vit]
        return self.multi_modal_projector(merged)  # [T, H_text]


def load_vision_encoder(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    progress: bool = False,
) -> VisionEncoder:
    """MoonViT + projector only (`vision_tower.*`, `multi_modal_projector.*`; decoder keys skipped)."""
    return build_and_load(VisionEncoder, checkpoint_dir, dtype, device, scope=VISION_SCOPE, progress=progress)
