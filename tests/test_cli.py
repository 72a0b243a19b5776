"""The `kimi-vl` command line and the offline pipeline behind `generate`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from services.cli import main
from services.common.checkpoint import write_checkpoint
from services.decoder.engine.params import SamplingParams
from services.offline import OfflinePipeline, user_messages

JSON_KEYS = {
    "prompt_ids",
    "token_ids",
    "text",
    "prompt_tokens",
    "tokens_per_s",
    "completion_tokens",
    "finish_reason",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(300, 200), (57, 130)]):
        path = root / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    return paths


def _generate_json(capsys, *argv: str) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_make_checkpoint_command(tmp_path, capsys):
    assert main(["make-checkpoint", str(tmp_path / "c"), "--seed", "3", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"checkpoint": str(tmp_path / "c"), "preset": "tiny", "seed": 3, "dtype": "float32"}
    for name in (
        "config.json",
        "model.safetensors.index.json",
        "tiktoken.model",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (tmp_path / "c" / name).is_file()


def test_generate_json_with_images_is_greedy_and_deterministic(ckpt, images, capsys):
    args = ["--checkpoint", str(ckpt), "--prompt", "Compare the pictures.", "--max-new-tokens", "6"]
    for path in images:
        args += ["--image", path]
    first = _generate_json(capsys, *args)
    assert JSON_KEYS <= set(first)
    assert first["prompt_tokens"] == len(first["prompt_ids"]) and first["completion_tokens"] == len(
        first["token_ids"]
    )
    assert 1 <= len(first["token_ids"]) <= 6 and first["tokens_per_s"] > 0
    # (300x200 -> pad 308x224 -> 22x16 patches -> 88 tokens) + (57x130 -> 84x140 -> 6x10 -> 15 tokens)
    pipeline = OfflinePipeline(ckpt, dtype=torch.float32)
    pad = pipeline.config.media_placeholder_token_id
    assert first["prompt_ids"].count(pad) == 88 + 15
    assert _generate_json(capsys, *args)["token_ids"] == first["token_ids"]


def test_generate_sampling_uses_the_seed(ckpt, capsys):
    base = [
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
    ]
    a = _generate_json(capsys, *base, "--seed", "1")
    assert _generate_json(capsys, *base, "--seed", "1")["token_ids"] == a["token_ids"]


def test_prompt_layout_system_and_images_before_text(ckpt):
    pipeline = OfflinePipeline(ckpt, dtype=torch.float32)
    tok = pipeline.tokenizer
    ids, embeds = pipeline.prompt_embeddings(user_messages("Hi <|im_end|>", "Be brief.", 0), [])
    assert embeds is None
    text = tok.decode(ids)
    assert text == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi <|im_end|><|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    # the user's "<|im_end|>" is plain text: exactly two real end-of-turn tokens in the prompt
    assert ids.count(tok.special_token_id("<|im_end|>")) == 2


def test_image_rows_replace_placeholders_only(ckpt, images):
    pipeline = OfflinePipeline(ckpt, dtype=torch.float32)
    img = Image.open(images[0])
    ids, embeds = pipeline.prompt_embeddings(user_messages("What is it?", None, 1), [img])
    ids_t = torch.tensor(ids)
    plain = pipeline.model.language_model.embed(ids_t)
    is_pad = ids_t == pipeline.config.media_placeholder_token_id
    assert torch.equal(embeds[~is_pad], plain[~is_pad])
    processed = pipeline.processor.preprocess([img])
    expected = pipeline.model.encode_images(processed.pixel_values, processed.image_grid_hws)
    assert torch.equal(embeds[is_pad], expected)
    result = pipeline.generate(user_messages("What is it?", None, 1), [img], SamplingParams(max_new_tokens=3))
    assert result.prompt_ids == ids and 1 <= result.completion_tokens <= 3


def test_bad_inputs_exit_2_with_a_message(ckpt, tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"definitely not a png")
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--image", str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json does not exist" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_console_script_is_installed(ckpt):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "generate",
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert JSON_KEYS <= set(json.loads(done.stdout))
