"""Config parsing: the release's config.json shape, required keys, contradictions."""

from __future__ import annotations

import copy

import pytest

from services.common.checkpoint import build_config
from services.common.config import (
    RopeScaling,
    parse_config,
    parse_processor_config,
    yarn_mscale,
)
from services.common.errors import CheckpointError

SPECIAL = {"[BOS]": 1024, "[EOS]": 1025, "<|im_end|>": 1026, "[PAD]": 1279, "<|media_pad|>": 1045}

# The published Kimi-VL-A3B-Instruct text_config (the values the spec lists).
RELEASE_TEXT = {
    "vocab_size": 163840,
    "max_position_embeddings": 131072,
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 800000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "tie_word_embeddings": False,
    "model_type": "deepseek_v3",
    "num_key_value_heads": 16,
}
RELEASE_VISION = {
    "model_type": "moonvit",
    "patch_size": 14,
    "init_pos_emb_height": 64,
    "init_pos_emb_width": 64,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "merge_kernel_size": [2, 2],
}


def release_config() -> dict:
    return {
        "model_type": "kimi_vl",
        "vision_config": copy.deepcopy(RELEASE_VISION),
        "text_config": copy.deepcopy(RELEASE_TEXT),
        "media_placeholder_token_id": 163605,
    }


def test_release_config_parses_with_its_architecture_facts():
    cfg = parse_config(release_config())
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok) == (
        2048,
        27,
        64,
        6,
    )
    assert t.latent_dim == 576 and t.qk_head_dim == 192
    assert t.softmax_scale == pytest.approx(192**-0.5)
    assert not t.is_moe_layer(0) and all(t.is_moe_layer(i) for i in range(1, 27))
    assert v.head_dim == 72 and v.merged_dim == 4608
    assert cfg.media_placeholder_token_id == 163605


def test_missing_keys_are_all_named():
    raw = release_config()
    del raw["text_config"]["kv_lora_rank"], raw["text_config"]["hidden_size"]
    with pytest.raises(CheckpointError, match=r"kv_lora_rank") as err:
        parse_config(raw)
    assert "hidden_size" in str(err.value)
    raw = release_config()
    del raw["vision_config"]["patch_size"]
    with pytest.raises(CheckpointError, match="vision_config.*patch_size"):
        parse_config(raw)
    with pytest.raises(CheckpointError, match="media_placeholder_token_id"):
        parse_config({k: v for k, v in release_config().items() if k != "media_placeholder_token_id"})


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("text_config", "n_group", 3, "not divisible by n_group"),
        ("text_config", "topk_group", 2, "topk_group"),
        ("text_config", "scoring_func", "relu", "scoring_func"),
        ("text_config", "topk_method", "random", "topk_method"),
        ("vision_config", "num_attention_heads", 7, "not divisible"),
        ("text_config", "rope_scaling", {"type": "linear", "factor": 2}, "not supported"),
        ("text_config", "rope_scaling", {"type": "yarn"}, "factor"),
    ],
)
def test_contradictions_are_rejected(section, key, value, message):
    raw = release_config()
    raw[section][key] = value
    with pytest.raises(CheckpointError, match=message):
        parse_config(raw)


def test_placeholder_outside_vocab_is_rejected():
    raw = release_config()
    raw["media_placeholder_token_id"] = 200000
    with pytest.raises(CheckpointError, match="outside the vocabulary"):
        parse_config(raw)


def test_yarn_rope_scaling_and_softmax_scale():
    raw = release_config()
    raw["text_config"]["rope_scaling"] = {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    t = parse_config(raw).text_config
    assert t.rope_scaling == RopeScaling("yarn", 40, 4096, 32, 1, 1.0, 1.0)
    m = 0.1 * 1.0 * __import__("math").log(40) + 1.0
    assert yarn_mscale(40, 1.0) == pytest.approx(m)
    assert t.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert yarn_mscale(1.0, 1.0) == 1.0


def test_processor_config_defaults_and_consistency():
    vision = parse_config(release_config()).vision_config
    cfg = parse_processor_config({"patch_size": 14, "in_token_limit": 16384}, vision)
    assert cfg.in_token_limit == 16384 and cfg.pad_input and cfg.pad_multiple == (28, 28)
    assert cfg.image_mean == (0.48145466, 0.4578275, 0.40821073)
    with pytest.raises(CheckpointError, match="contradicts"):
        parse_processor_config({"patch_size": 16}, vision)
    with pytest.raises(CheckpointError, match="patch_size"):
        parse_processor_config({}, vision)


def test_generated_config_follows_the_release_schema():
    raw = build_config("tiny", 1280, SPECIAL)
    assert set(RELEASE_TEXT) <= set(raw["text_config"])
    assert set(RELEASE_VISION) <= set(raw["vision_config"])
    cfg = parse_config(raw)
    t = cfg.text_config
    assert t.n_group > t.topk_group > 1 and t.num_hidden_layers >= 2
    assert not t.is_moe_layer(0) and t.is_moe_layer(1)
    assert cfg.vision_config.num_hidden_layers >= 2
    mid = parse_config(build_config("mid", 1280, SPECIAL))
    assert mid.text_config.hidden_size == 2048 and mid.text_config.n_routed_experts == 64


def test_generation_config_is_parsed_once_with_checked_fields(tmp_path):
    from services.common.config import GenerationConfig, load_generation_config, parse_generation_config
    from services.decoder.engine.params import generation_defaults

    assert load_generation_config(tmp_path) == GenerationConfig()  # no file: recommends nothing
    (tmp_path / "generation_config.json").write_text(
        '{"eos_token_id": 7, "temperature": 0.8, "do_sample": false}'
    )
    cfg = load_generation_config(tmp_path)
    assert cfg.eos_token_id == (7,) and cfg.temperature == 0.8
    assert generation_defaults(cfg) == {"temperature": 0.0}  # do_sample false: greedy
    assert parse_generation_config({"eos_token_id": [1, 2], "top_k": 20}).eos_token_id == (1, 2)
    bad_values = {"eos_token_id": "x", "top_p": "high", "do_sample": "no", "max_new_tokens": True}
    for field, value in bad_values.items():
        with pytest.raises(CheckpointError, match=field):
            parse_generation_config({field: value})
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_generation_config(tmp_path)
