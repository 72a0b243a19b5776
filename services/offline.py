"""Offline generation: chat messages with images in, the model's answer out, in one process.

The first main job of the project and the reference for what the served pipeline must return:
the checkpoint's chat template, the native-resolution processor, MoonViT + projector, and the
decoder through the engine's paged KV cache. Knows nothing about Ray, gRPC or Redis.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.common.chat_template import encode_chat, end_of_turn_ids
from services.common.config import load_config, load_processor_config
from services.common.errors import InvalidInputError
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.core import MediaSpan
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.kimi_vl import load_kimi_vl
from services.preprocess.processor import ImageProcessor


@dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    time_to_first_token_s: float
    total_s: float

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of generation (prefill included, model loading not)."""
        return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one: the decode loop's own speed."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "time_to_first_token_s": round(self.time_to_first_token_s, 4),
        }


def user_messages(prompt: str, system: str | None, n_images: int) -> list[dict[str, Any]]:
    """One user turn with the images before the text, as the official processor's examples do."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return messages


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file, with a clear error if it is not one (full media handling: preprocess)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as e:
        raise InvalidInputError(f"image file {path} does not exist") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"{path} is not a readable image: {e}") from e


class OfflinePipeline:
    """Everything needed to answer a chat request from one checkpoint directory."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cpu",
        engine_config: EngineConfig | None = None,
        progress: bool = False,
    ) -> None:
        self.config = load_config(checkpoint_dir)
        self.tokenizer = KimiTokenizer.from_pretrained(checkpoint_dir)
        self.processor = ImageProcessor(load_processor_config(checkpoint_dir, self.config.vision_config))
        self.model = load_kimi_vl(checkpoint_dir, dtype=dtype, device=device, progress=progress)
        self.stop_token_ids = end_of_turn_ids(checkpoint_dir, self.config.text_config, self.tokenizer)
        self.engine = LLMEngine(self.model.language_model, engine_config or EngineConfig())

    def prompt_media(
        self, messages: list[dict[str, Any]], images: Sequence[Image.Image]
    ) -> tuple[list[int], list[MediaSpan]]:
        """Token ids of the rendered prompt and each image's embeddings at its placeholder run."""
        if not images:
            return encode_chat(self.tokenizer, messages, image_token_counts=[]).input_ids, []
        processed = self.processor.preprocess(images)
        chat = encode_chat(self.tokenizer, messages, image_token_counts=processed.num_tokens)
        device = next(self.model.parameters()).device
        # grids stay on the host: MoonViT reads them to lay out attention (no device sync)
        with torch.inference_mode():
            pixels = processed.pixel_values.to(device)
            image_embeds = self.model.encode_images(pixels, processed.image_grid_hws)
        rows = image_embeds.split([length for _, length in chat.image_spans])
        return chat.input_ids, [
            MediaSpan(start, embeds) for (start, _), embeds in zip(chat.image_spans, rows, strict=True)
        ]

    def prompt_embeddings(
        self, messages: list[dict[str, Any]], images: Sequence[Image.Image]
    ) -> tuple[list[int], torch.Tensor | None]:
        """Token ids and the whole prompt's input embeddings [T, H] (None without images): what a
        reference implementation is fed to check ours."""
        ids, media = self.prompt_media(messages, images)
        if not media:
            return ids, None
        with torch.inference_mode():
            embeds = self.model.language_model.embed(torch.tensor(ids, device=media[0].embeds.device))
            for span in media:
                embeds[span.offset : span.offset + span.embeds.shape[0]] = span.embeds
        return ids, embeds

    def generate(
        self, messages: list[dict[str, Any]], images: Sequence[Image.Image], params: SamplingParams
    ) -> GenerationResult:
        start = time.perf_counter()
        if not params.stop_token_ids:
            params = dataclasses.replace(params, stop_token_ids=self.stop_token_ids)
        prompt_ids, media = self.prompt_media(messages, images)
        tokens: list[int] = []
        first = 0.0
        finish_reason = "length"
        for out in self.engine.generate(prompt_ids, params, media):
            if not tokens:
                first = time.perf_counter() - start
            tokens.append(out.token_id)
            if out.finished:
                finish_reason = out.finish_reason or "stop"
        total = time.perf_counter() - start
        visible = [t for t in tokens if t not in params.stop_token_ids]
        return GenerationResult(
            prompt_ids=prompt_ids,
            token_ids=tokens,
            text=self.tokenizer.decode(visible, skip_special_tokens=True),
            finish_reason=finish_reason,
            time_to_first_token_s=first,
            total_s=total,
        )
