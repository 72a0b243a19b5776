"""The image processor against a plain re-implementation of spec section 4 (PIL + numpy, patch by patch)."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.config import ProcessorConfig, parse_processor_config
from services.common.errors import InvalidInputError
from services.preprocess.processor import (
    ImageProcessor,
    crop_box,
    num_image_tokens,
    padded_size,
    resize_size,
)

CFG = parse_processor_config({"patch_size": 14})
CROP_CFG = dataclasses.replace(CFG, pad_input=False)
PALETTE_ZERO = (30, 160, 90)  # a non-black colour at palette index 0: padding must use it


def make_image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * width + height)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        palette = rng.integers(0, 256, 768, dtype=np.uint8)
        palette[:3] = PALETTE_ZERO
        image.putpalette(palette.tolist())  # L + palette → P
        return image
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


# --------------------------------------------------------------------------------------------
# The reference: spec section 4 written out directly, no shared code with the processor.
# --------------------------------------------------------------------------------------------


def reference(image: Image.Image, cfg: ProcessorConfig, limit: int | None = None):
    limit = cfg.in_token_limit if limit is None else limit
    p, (kh, kw) = cfg.patch_size, cfg.merge_kernel_size
    w, h = image.size
    if (w // p) * (h // p) > limit:
        scale = math.sqrt(limit / ((w // p) * (h // p)))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
    w, h = image.size
    if cfg.pad_input:
        new_w, new_h = w + (p * kw - w % (p * kw)) % (p * kw), h + (p * kh - h % (p * kh)) % (p * kh)
        canvas = Image.new(image.mode, (new_w, new_h), 0)
        if image.mode == "P":
            canvas.putpalette(image.getpalette())
        canvas.paste(image, (0, 0))
        image = canvas
    else:
        new_w, new_h = w - w % (p * kw), h - h % (p * kh)
        top, left = int(round((h - new_h) / 2.0)), int(round((w - new_w) / 2.0))
        image = image.crop((left, top, left + new_w, top + new_h))
    w, h = image.size
    if w // p >= 512 or h // p >= 512:
        raise ValueError("grid too large")
    pixels = np.asarray(image.convert("RGB")).astype(np.float32) / np.float32(255)
    pixels = (pixels - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)
    patches = []
    for row in range(h // p):
        for col in range(w // p):
            patch = pixels[row * p : (row + 1) * p, col * p : (col + 1) * p, :]  # [p, p, 3]
            patches.append(patch.transpose(2, 0, 1))
    return np.stack(patches), (h // p, w // p)


def assert_matches_reference(images, cfg, limit=None):
    out = ImageProcessor(cfg).preprocess(images, token_limit=limit)
    refs = [reference(image, cfg, limit) for image in images]
    expected = np.concatenate([patches for patches, _ in refs])
    assert out.pixel_values.dtype == torch.float32
    assert out.pixel_values.shape == (expected.shape[0], 3, 14, 14)
    np.testing.assert_array_equal(out.pixel_values.numpy(), expected)
    assert out.image_grid_hws.dtype == torch.int64
    assert out.image_grid_hws.tolist() == [list(grid) for _, grid in refs]
    assert out.num_tokens == [h * w // 4 for _, (h, w) in refs]
    return out


SIZES = [(1, 1), (13, 13), (14, 14), (28, 28), (29, 57), (5000, 20), (20, 5000), (1200, 900), (3000, 700)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rgb_matches_reference(size):
    assert_matches_reference([make_image(*size, "RGB")], CFG)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "1"])
@pytest.mark.parametrize("size", [(29, 57), (1200, 900)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_modes_match_reference(mode, size):
    assert_matches_reference([make_image(*size, mode)], CFG)


def test_several_images_are_concatenated_in_order():
    images = [make_image(29, 57, "RGB"), make_image(1, 1, "P"), make_image(100, 30, "L")]
    out = assert_matches_reference(images, CFG)
    assert out.image_grid_hws.tolist() == [[6, 4], [2, 2], [4, 8]]


def test_large_image_is_shrunk_to_the_limit():
    out = ImageProcessor(CFG).preprocess([make_image(1200, 900, "RGB")])
    # 85·64 = 5440 > 4096 patches → scale √(4096/5440) → 1041×780 → padded 1064×784.
    assert resize_size(1200, 900, 14, 4096) == (1041, 780)
    assert out.image_grid_hws.tolist() == [[56, 76]]
    assert out.num_tokens == [28 * 38]


def test_token_limit_overrides_config():
    image = make_image(1200, 900, "RGB")
    out = assert_matches_reference([image], CFG, limit=256)
    assert resize_size(1200, 900, 14, 256) == (260, 195)
    assert out.image_grid_hws.tolist() == [[14, 20]]
    assert out.num_tokens == [70] == [num_image_tokens(1200, 900, CFG, token_limit=256)]


@pytest.mark.parametrize("size", [(29, 57), (1200, 900), (100, 73), (61, 90)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_crop_path_matches_reference(size, mode):
    assert_matches_reference([make_image(*size, mode)], CROP_CFG)


def test_crop_box_uses_torchvision_rounding():
    # 100 → 84: (100 - 84) / 2 = 8; 73 → 56: 8.5 rounds to 8 (banker's rounding, as round()).
    assert crop_box(100, 73, (28, 28)) == (8, 8, 92, 64)
    assert crop_box(61, 90, (28, 28)) == (2, 3, 58, 87)  # 2.5 → 2, 3.0 → 3
    assert padded_size(29, 57, (28, 28)) == (56, 84)


def test_crop_path_rejects_images_smaller_than_a_merge_window():
    with pytest.raises(InvalidInputError, match="too small"):
        ImageProcessor(CROP_CFG).preprocess([make_image(5000, 20, "RGB")])


def test_padding_is_zero_in_the_image_mode():
    mean = np.array(CFG.image_mean, np.float32)
    std = np.array(CFG.image_std, np.float32)
    out = ImageProcessor(CFG).preprocess([make_image(13, 13, "RGB")])
    assert out.image_grid_hws.tolist() == [[2, 2]]
    pad_patch = out.pixel_values[3].numpy()  # bottom-right patch: all padding
    np.testing.assert_array_equal(pad_patch, np.broadcast_to(((0 - mean) / std)[:, None, None], (3, 14, 14)))
    out = ImageProcessor(CFG).preprocess([make_image(13, 13, "P")])
    colour = np.array(PALETTE_ZERO, np.float32) / np.float32(255)
    np.testing.assert_array_equal(out.pixel_values[3, :, 0, 0].numpy(), (colour - mean) / std)


def test_alpha_is_dropped_not_composited():
    image = Image.new("RGBA", (28, 28), (200, 100, 50, 0))
    out = ImageProcessor(CFG).preprocess([image])
    rgb = np.array([200, 100, 50], np.float32) / np.float32(255)
    expected = (rgb - np.array(CFG.image_mean, np.float32)) / np.array(CFG.image_std, np.float32)
    np.testing.assert_array_equal(out.pixel_values[0, :, 5, 5].numpy(), expected)


def test_patch_layout_is_row_col_channel_py_px():
    cfg = dataclasses.replace(CFG, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    pixels = np.zeros((56, 28, 3), np.uint8)
    pixels[14 * 2 + 3, 14 * 1 + 5] = (255, 0, 0)  # patch row 2, col 1, py 3, px 5, channel 0
    out = ImageProcessor(cfg).preprocess([Image.fromarray(pixels)])
    hot = (out.pixel_values == 1.0).nonzero().tolist()
    assert hot == [[2 * 2 + 1, 0, 3, 5]]


@pytest.mark.parametrize("size", [(7200, 30), (30, 7200), (20000, 14), (7141, 28), (60000, 20)])
def test_rejects_grid_sides_of_512_or_more(size):
    # 7200×30: 514·2 patches, no shrink; padded to 7224×56 → a 516-patch side.
    # 7141×28 pads to 7168 = 512 patches. 60000×20 shrinks to 58662×19, still far too wide.
    with pytest.raises(InvalidInputError, match=f"{size[0]}x{size[1]}"):
        num_image_tokens(*size, CFG)
    if size[0] * size[1] <= 300_000:
        with pytest.raises(InvalidInputError, match="patch grid"):
            ImageProcessor(CFG).preprocess([make_image(*size, "L")])


def test_accepts_grid_side_510():
    out = ImageProcessor(CFG).preprocess([make_image(7140, 28, "RGB")])
    assert out.image_grid_hws.tolist() == [[2, 510]]


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0)])
def test_rejects_zero_size(size):
    with pytest.raises(InvalidInputError, match="zero size"):
        ImageProcessor(CFG).preprocess([Image.new("RGB", size)])
    with pytest.raises(InvalidInputError, match="zero size"):
        num_image_tokens(*size, CFG)


def test_rejects_non_positive_token_limit():
    with pytest.raises(InvalidInputError, match="token limit"):
        ImageProcessor(CFG).preprocess([make_image(28, 28, "RGB")], token_limit=0)


def test_empty_list():
    out = ImageProcessor(CFG).preprocess([])
    assert out.pixel_values.shape == (0, 3, 14, 14)
    assert out.image_grid_hws.shape == (0, 2)
    assert out.num_tokens == []


@pytest.mark.parametrize("cfg", [CFG, CROP_CFG], ids=["pad", "crop"])
def test_num_image_tokens_agrees_with_preprocess(cfg):
    rng = np.random.default_rng(1)
    sizes = [(28, 56), (1204, 14), (4000, 60), (1, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(28, 2400, 2)) for _ in range(24)]
    processor = ImageProcessor(cfg)
    for width, height in sizes:
        image = Image.new("L", (width, height))
        for limit in (None, 64):
            try:
                expected = num_image_tokens(width, height, cfg, token_limit=limit)
            except InvalidInputError:
                with pytest.raises(InvalidInputError):
                    processor.preprocess([image], token_limit=limit)
                continue
            out = processor.preprocess([image], token_limit=limit)
            assert out.num_tokens == [expected]
            assert out.pixel_values.shape[0] == 4 * expected


def test_truncated_file_is_invalid_input():
    buffer = io.BytesIO()
    make_image(400, 300, "RGB").save(buffer, "JPEG")
    image = Image.open(io.BytesIO(buffer.getvalue()[:2000]))
    with pytest.raises(InvalidInputError, match="cannot decode"):
        ImageProcessor(CFG).preprocess([image])
