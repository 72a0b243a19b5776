"""Kimi-VL image processor: PIL images → packed 14×14 patches at native resolution.

The rule (spec section 4), one image at a time:
1. shrink the image in its own PIL mode (bicubic) when its patch count exceeds the token limit;
2. pad right/bottom with the value 0 of its own mode to multiples of patch × merge kernel
   (`pad_input`), else centre-crop to those multiples;
3. reject grids with a side ≥ 512 patches (the vision tower's rotary table);
4. convert to RGB only now, scale to [0, 1] and normalise with `image_mean` / `image_std`;
5. cut into patches ordered (row, col, channel, py, px).

`num_image_tokens` replays steps 1-3 on the size alone, so a prompt can be sized without pixels.

Knows nothing about the model, the tokenizer, video sampling or transport; depends on
torch / numpy / Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from services.common.config import ProcessorConfig
from services.common.errors import InvalidInputError

# The vision tower's 2D rotary table covers 512 positions per side; the reference rejects a grid
# side of 512 or more.
MAX_GRID_SIDE = 512


@dataclass
class ProcessedImages:
    """Patches of a list of images, concatenated in order.

    pixel_values:   [P, 3, p, p] float32, normalised.
    image_grid_hws: [N, 2] int64, (h, w) in patches per image.
    num_tokens:     placeholder tokens per image, h·w / (kernel area).
    """

    pixel_values: torch.Tensor
    image_grid_hws: torch.Tensor
    num_tokens: list[int]


# ---------------------------------------------------------------------------------------------
# Sizes (no pixels)
# ---------------------------------------------------------------------------------------------


def resize_size(width: int, height: int, patch_size: int, token_limit: int) -> tuple[int, int]:
    """Step 1: (width, height) after the token-limit shrink (exact int truncation, as the reference)."""
    patches = (width // patch_size) * (height // patch_size)
    if patches <= token_limit:
        return width, height
    scale = math.sqrt(token_limit / patches)
    return int(width * scale), int(height * scale)


def padded_size(width: int, height: int, multiple: tuple[int, int]) -> tuple[int, int]:
    """Step 2 with `pad_input`: (width, height) rounded up to `multiple` = (mult_h, mult_w)."""
    mult_h, mult_w = multiple
    return -(-width // mult_w) * mult_w, -(-height // mult_h) * mult_h


def crop_box(width: int, height: int, multiple: tuple[int, int]) -> tuple[int, int, int, int]:
    """Step 2 without `pad_input`: centred (left, top, right, bottom) box rounded down to `multiple`.

    Offsets use torchvision's `center_crop` rounding: int(round((W - w) / 2.0)).
    """
    mult_h, mult_w = multiple
    new_w, new_h = width - width % mult_w, height - height % mult_h
    left = int(round((width - new_w) / 2.0))
    top = int(round((height - new_h) / 2.0))
    return left, top, left + new_w, top + new_h


def check_grid(grid_h: int, grid_w: int, width: int, height: int) -> None:
    """Step 3: reject an empty grid or one the rotary table cannot cover."""
    if grid_h <= 0 or grid_w <= 0:
        raise InvalidInputError(f"image of {width}x{height} pixels is too small: it yields no patch")
    if grid_h >= MAX_GRID_SIDE or grid_w >= MAX_GRID_SIDE:
        raise InvalidInputError(
            f"image of {width}x{height} pixels gives a {grid_h}x{grid_w} patch grid; "
            f"each side must stay below {MAX_GRID_SIDE} patches (aspect ratio too extreme)"
        )


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})")


def _limit(cfg: ProcessorConfig, token_limit: int | None) -> int:
    limit = cfg.in_token_limit if token_limit is None else token_limit
    if limit <= 0:
        raise InvalidInputError(f"token limit must be positive, got {limit}")
    return limit


def output_size(
    width: int, height: int, cfg: ProcessorConfig, token_limit: int | None = None
) -> tuple[int, int]:
    """(width, height) in pixels of the image that gets patchified, after steps 1-3."""
    _check_size(width, height)
    new_w, new_h = resize_size(width, height, cfg.patch_size, _limit(cfg, token_limit))
    if new_w <= 0 or new_h <= 0:
        raise InvalidInputError(f"image of {width}x{height} pixels shrinks to nothing under the token limit")
    if cfg.pad_input:
        out_w, out_h = padded_size(new_w, new_h, cfg.pad_multiple)
    else:
        left, top, right, bottom = crop_box(new_w, new_h, cfg.pad_multiple)
        out_w, out_h = right - left, bottom - top
    check_grid(out_h // cfg.patch_size, out_w // cfg.patch_size, width, height)
    return out_w, out_h


def num_image_tokens(width: int, height: int, cfg: ProcessorConfig, token_limit: int | None = None) -> int:
    """Placeholder tokens an image of this size becomes (agrees with `ImageProcessor.preprocess`)."""
    out_w, out_h = output_size(width, height, cfg, token_limit)
    kernel_h, kernel_w = cfg.merge_kernel_size
    return (out_h // cfg.patch_size // kernel_h) * (out_w // cfg.patch_size // kernel_w)


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic resize in the image's own mode (PIL itself uses nearest for P and 1 modes)."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def pad_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pad right/bottom to `size` with the value 0 of the image's own mode (palette index 0 for P).

    A crop box reaching past the image fills with zeros and keeps the mode and palette.
    """
    if image.size == size:
        return image
    return image.crop((0, 0, *size))


def center_crop_image(image: Image.Image, multiple: tuple[int, int]) -> Image.Image:
    box = crop_box(*image.size, multiple)
    if box == (0, 0, *image.size):
        return image
    return image.crop(box)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8; an alpha channel is dropped, not composited (as the reference)."""
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:
        raise InvalidInputError(f"cannot convert an image of mode {image.mode!r} to RGB: {e}") from e
    return np.asarray(rgb, dtype=np.uint8)


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3·256] float32: entry 256·c + v → (v / 255 − mean_c) / std_c.

    Computed with the same float32 operations as to_tensor + normalize, so a lookup is bit-exact.
    """
    values = torch.arange(256, dtype=torch.float32).div(255).unsqueeze(0)  # [1, 256]
    mean_t = torch.tensor(mean, dtype=torch.float32).unsqueeze(1)  # [3, 1]
    std_t = torch.tensor(std, dtype=torch.float32).unsqueeze(1)
    return values.sub(mean_t).div(std_t).reshape(-1).numpy()


_CHANNEL_OFFSET = (np.arange(3, dtype=np.uint16) * 256).reshape(1, 3, 1, 1)  # [1, 3, 1, 1]


def patchify_into(rgb: np.ndarray, patch_size: int, table: np.ndarray, out: np.ndarray) -> None:
    """Normalise and cut `rgb` [H, W, 3] uint8 into `out` [h·w, 3, p, p] float32 (contiguous).

    One transposed copy of the bytes ([h, p, w, p, 3] → [h, w, 3, p, p]), one offset so that
    each value indexes its channel's row of `table`, one lookup written straight into `out`.
    """
    height, width, _ = rgb.shape
    p = patch_size
    grid = rgb.reshape(height // p, p, width // p, p, 3).transpose(0, 2, 4, 1, 3)
    index = np.ascontiguousarray(grid).reshape(-1, 3, p, p).astype(np.uint16)  # [h·w, 3, p, p]
    index += _CHANNEL_OFFSET
    np.take(table, index, out=out, mode="clip")


def prepare_image(image: Image.Image, cfg: ProcessorConfig, token_limit: int | None = None) -> np.ndarray:
    """Steps 1-4 up to the RGB bytes: [H, W, 3] uint8 with H, W multiples of patch × kernel."""
    width, height = image.size
    limit = _limit(cfg, token_limit)
    out_size = output_size(width, height, cfg, limit)
    try:  # decoding is lazy in PIL: a truncated file fails here, on first pixel access
        resized = resize_image(image, resize_size(width, height, cfg.patch_size, limit))
        fitted = (
            pad_image(resized, out_size) if cfg.pad_input else center_crop_image(resized, cfg.pad_multiple)
        )
        return to_rgb_array(fitted)
    except OSError as e:
        raise InvalidInputError(f"cannot decode image: {e}") from e


class ImageProcessor:
    """Kimi-VL's native-resolution image processor for one `ProcessorConfig`."""

    def __init__(self, cfg: ProcessorConfig) -> None:
        self.cfg = cfg
        self._table = normalize_table(cfg.image_mean, cfg.image_std)  # [3·256] float32

    def num_tokens(self, width: int, height: int, *, token_limit: int | None = None) -> int:
        return num_image_tokens(width, height, self.cfg, token_limit)

    def preprocess(self, images: Sequence[Image.Image], *, token_limit: int | None = None) -> ProcessedImages:
        """Patches of all `images` in order; `token_limit` replaces `in_token_limit` (video frames)."""
        p = self.cfg.patch_size
        kernel_h, kernel_w = self.cfg.merge_kernel_size
        rgbs = [prepare_image(image, self.cfg, token_limit) for image in images]
        grids = [(rgb.shape[0] // p, rgb.shape[1] // p) for rgb in rgbs]
        total = sum(h * w for h, w in grids)
        pixel_values = torch.empty((total, 3, p, p), dtype=torch.float32)  # [P, 3, p, p]
        out = pixel_values.numpy()
        start = 0
        for rgb, (h, w) in zip(rgbs, grids, strict=True):
            patchify_into(rgb, p, self._table, out[start : start + h * w])
            start += h * w
        return ProcessedImages(
            pixel_values=pixel_values,
            image_grid_hws=torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
            num_tokens=[(h // kernel_h) * (w // kernel_w) for h, w in grids],
        )
