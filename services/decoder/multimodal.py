"""Placing visual embeddings into a prompt's token embeddings.

Knows nothing about how the embeddings were made (MoonViT in-process, or bytes from the encoder
service): it only checks that the placeholder run lengths and the embedding rows agree.
"""

from __future__ import annotations

import torch

from services.common.errors import InvalidInputError


def merge_image_embeddings(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor, placeholder_id: int
) -> torch.Tensor:
    """Replace, in order, the placeholder rows of `inputs_embeds` [T, H] with `image_embeds` [N, H].

    `input_ids` [T]; N must equal the number of placeholder tokens in the prompt.
    """
    mask = input_ids == placeholder_id
    n_slots = int(mask.sum())
    if n_slots != image_embeds.shape[0]:
        raise InvalidInputError(
            f"the prompt has {n_slots} image placeholder tokens but {image_embeds.shape[0]} image "
            "embedding rows were given"
        )
    if image_embeds.shape[-1] != inputs_embeds.shape[-1]:
        raise InvalidInputError(
            f"image embeddings have width {image_embeds.shape[-1]}, "
            f"the decoder expects {inputs_embeds.shape[-1]}"
        )
    out = inputs_embeds.clone()
    out[mask] = image_embeds.to(dtype=out.dtype, device=out.device)
    return out
