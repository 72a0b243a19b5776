"""Loading generated checkpoints: sharding, dtypes, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.common.checkpoint import official_weight_shapes, write_checkpoint
from services.common.config import load_config
from services.common.errors import CheckpointError
from services.common.weights import INDEX_FILE, checkpoint_weight_map
from services.decoder.loading import load_text_model
from services.kimi_vl import load_kimi_vl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny", dtype=torch.float32, shard_bytes=256 * 1024
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_is_sharded_with_official_keys(tiny):
    index = json.loads((tiny / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = load_config(tiny)
    assert set(index["weight_map"]) == set(official_weight_shapes(cfg))
    assert "language_model.model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "language_model.model.layers.1.mlp.gate.e_score_correction_bias" in index["weight_map"]


def test_writer_is_deterministic(tmp_path, tiny):
    again = write_checkpoint(tmp_path / "again", dtype=torch.float32, shard_bytes=256 * 1024)
    key = "language_model.model.layers.2.self_attn.kv_b_proj.weight"
    wm1, wm2 = checkpoint_weight_map(tiny), checkpoint_weight_map(again)
    with safe_open(wm1[key], "pt") as a, safe_open(wm2[key], "pt") as b:
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_model_loads_in_each_dtype(tiny, dtype):
    model = load_kimi_vl(tiny, dtype=dtype)
    key = "language_model.model.layers.0.self_attn.o_proj.weight"
    with safe_open(checkpoint_weight_map(tiny)[key], "pt") as f:
        expected = f.get_tensor(key).to(dtype)
    assert torch.equal(model.language_model.model.layers[0].self_attn.o_proj.weight, expected)
    assert all(p.device.type == "cpu" for p in model.parameters())
    bias = model.language_model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32  # router math stays fp32 whatever the model dtype


def _rewrite_shard_without(ckpt: Path, drop: str | None = None, replace: dict | None = None) -> None:
    wm = checkpoint_weight_map(ckpt)
    targets = {drop} if drop else set(replace or {})
    for path in {wm[k] for k in targets}:
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        tensors.update({k: v for k, v in (replace or {}).items() if k in tensors})
        save_file(tensors, str(path))
    if drop:
        index = json.loads((ckpt / INDEX_FILE).read_text())
        del index["weight_map"][drop]
        (ckpt / INDEX_FILE).write_text(json.dumps(index))


def test_missing_key_is_named(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path / "missing")
    key = "language_model.model.layers.2.mlp.experts.3.up_proj.weight"
    _rewrite_shard_without(ckpt, drop=key)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
        load_text_model(ckpt, torch.float32)


def test_wrong_shape_is_named(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path / "shape")
    key = "language_model.model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    _rewrite_shard_without(ckpt, replace={key: torch.zeros(3, 5)})
    with pytest.raises(CheckpointError, match=r"wrong shapes.*kv_a_proj_with_mqa.weight has shape \[3, 5\]"):
        load_text_model(ckpt, torch.float32)


def test_unexpected_key_is_named(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path / "extra")
    extra = "language_model.model.layers.0.self_attn.q_a_proj.weight"
    save_file({extra: torch.zeros(4, 4)}, str(ckpt / "extra.safetensors"))
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"][extra] = "extra.safetensors"
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): .*q_a_proj"):
        load_text_model(ckpt, torch.float32)


def test_missing_shard_file_and_index(tiny, tmp_path):
    ckpt = _copy(tiny, tmp_path / "noshard")
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        load_text_model(ckpt, torch.float32)
    (ckpt / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="neither"):
        load_text_model(ckpt, torch.float32)


def test_vision_encoder_loads_only_its_keys(tiny):
    from services.vision_encoder.model import load_vision_encoder

    encoder = load_vision_encoder(tiny, torch.float32)
    names = {n for n, _ in encoder.named_parameters()}
    assert names and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in names)
    whole = load_kimi_vl(tiny, torch.float32)
    for name, param in encoder.named_parameters():
        assert torch.equal(param, whole.get_parameter(name))
