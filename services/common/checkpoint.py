"""Writing small Kimi-VL checkpoints in the official Hugging Face layout.

Model weights cannot be downloaded here, so tests, benchmarks and the offline main job run on
checkpoints this module generates: the release's config schema, the official key names (routed
experts per expert, as the release stores them), sharded safetensors with
`model.safetensors.index.json`, `preprocessor_config.json`, `generation_config.json` and a
small tiktoken vocabulary carrying the release's special tokens. Weights are random but
deterministic: each tensor's values depend only on the seed and its key.

The key/shape table (`official_weight_shapes`) is written from the published format, not from
our modules, so loading a generated checkpoint is a check of the model code against the format.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.config import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    PREPROCESSOR_CONFIG_FILE,
    KimiVLConfig,
    parse_config,
)
from services.common.errors import InvalidInputError
from services.common.weights import INDEX_FILE

_TEXT_BASE: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "max_position_embeddings": 131072,
    "n_shared_experts": 2,
    "routed_scaling_factor": 2.446,
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 800000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "q_lora_rank": None,
}

# Each preset: the sizes that differ from the release. `vocab_size` and the special-token ids
# always come from the generated tokenizer.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Big enough to exercise everything: a dense and two MoE layers, 4 expert groups of which 2
    # are kept, MLA ranks, 2 ViT layers, a position table that real images get interpolated to.
    "tiny": {
        "vision": {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "intermediate_size": 96,
            "init_pos_emb_height": 16,
            "init_pos_emb_width": 16,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "kv_lora_rank": 32,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 32,
            "v_head_dim": 32,
        },
    },
    # The release's widths (MoonViT 1152, decoder 2048, 64 experts of 1408, MLA 512/64/128)
    # with few layers: for benchmarks at realistic per-layer cost.
    "mid": {
        "vision": {"num_hidden_layers": 2},
        "text": {"num_hidden_layers": 2},
    },
}

_RELEASE_VISION: dict[str, Any] = {
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
_RELEASE_TEXT: dict[str, Any] = {
    **_TEXT_BASE,
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
}
_PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "KimiVLImageProcessor",
    "patch_size": 14,
    "merge_kernel_size": [2, 2],
    "in_token_limit": 4096,
    "pad_input": True,
    "num_pooled_tokens": 1024,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def official_weight_shapes(cfg: KimiVLConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint layout with its shape."""
    v, t = cfg.vision_config, cfg.text_config
    shapes: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embed.proj.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
        "vision_tower.patch_embed.proj.bias": (v.hidden_size,),
        "vision_tower.patch_embed.pos_emb.weight": (
            v.init_pos_emb_height,
            v.init_pos_emb_width,
            v.hidden_size,
        ),
        "vision_tower.encoder.final_layernorm.weight": (v.hidden_size,),
        "vision_tower.encoder.final_layernorm.bias": (v.hidden_size,),
    }
    for i in range(v.num_hidden_layers):
        b = f"vision_tower.encoder.blocks.{i}."
        for name, out_f, in_f in (
            ("wqkv", 3 * v.hidden_size, v.hidden_size),
            ("wo", v.hidden_size, v.hidden_size),
            ("mlp.fc0", v.intermediate_size, v.hidden_size),
            ("mlp.fc1", v.hidden_size, v.intermediate_size),
        ):
            shapes[b + name + ".weight"] = (out_f, in_f)
            shapes[b + name + ".bias"] = (out_f,)
        for norm in ("norm0", "norm1"):
            shapes[b + norm + ".weight"] = (v.hidden_size,)
            shapes[b + norm + ".bias"] = (v.hidden_size,)
    m = v.merged_dim
    shapes.update(
        {
            "multi_modal_projector.pre_norm.weight": (v.hidden_size,),
            "multi_modal_projector.pre_norm.bias": (v.hidden_size,),
            "multi_modal_projector.linear_1.weight": (m, m),
            "multi_modal_projector.linear_1.bias": (m,),
            "multi_modal_projector.linear_2.weight": (t.hidden_size, m),
            "multi_modal_projector.linear_2.bias": (t.hidden_size,),
        }
    )
    shapes.update(_text_weight_shapes(cfg))
    return shapes


def _mlp_shapes(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (width, hidden),
        f"{prefix}up_proj.weight": (width, hidden),
        f"{prefix}down_proj.weight": (hidden, width),
    }


def _text_weight_shapes(cfg: KimiVLConfig) -> dict[str, tuple[int, ...]]:
    t = cfg.text_config
    h, nh = t.hidden_size, t.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (t.vocab_size, h),
        "language_model.model.norm.weight": (h,),
    }
    if not t.tie_word_embeddings:
        shapes["language_model.lm_head.weight"] = (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        a = p + "self_attn."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if t.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (nh * t.qk_head_dim, h)
        else:
            shapes[a + "q_a_proj.weight"] = (t.q_lora_rank, h)
            shapes[a + "q_a_layernorm.weight"] = (t.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (nh * t.qk_head_dim, t.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (t.latent_dim, h)
        shapes[a + "kv_a_layernorm.weight"] = (t.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (nh * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (h, nh * t.v_head_dim)
        if not t.is_moe_layer(i):
            shapes.update(_mlp_shapes(p + "mlp.", h, t.intermediate_size))
            continue
        shapes[p + "mlp.gate.weight"] = (t.n_routed_experts, h)
        if t.topk_method == "noaux_tc":  # the correction bias exists only for aux-loss-free routing
            shapes[p + "mlp.gate.e_score_correction_bias"] = (t.n_routed_experts,)
        for e in range(t.n_routed_experts):
            shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", h, t.moe_intermediate_size))
        shapes.update(_mlp_shapes(p + "mlp.shared_experts.", h, t.n_shared_experts * t.moe_intermediate_size))
    return shapes


def _random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic values for one key; scales keep activations O(1) through the layers."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    x = torch.randn(shape, generator=gen)
    if key.endswith("e_score_correction_bias"):
        return 0.5 * x  # large enough, with negative values, that group masking matters
    if "norm" in key.rsplit(".", 2)[-2] and key.endswith("weight"):
        return 1.0 + 0.1 * x
    if key.endswith("bias"):
        return 0.02 * x
    if key.endswith("pos_emb.weight"):
        return 0.1 * x
    if key.endswith("embed_tokens.weight"):
        return x
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return x / math.sqrt(fan_in)


def build_config(
    preset: str,
    vocab_size: int,
    special_ids: dict[str, int],
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `config.json` dict of a generated checkpoint."""
    if preset not in PRESETS:
        raise InvalidInputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    vision = {**_RELEASE_VISION, **PRESETS[preset]["vision"], **(vision_overrides or {})}
    text = {
        **_RELEASE_TEXT,
        **PRESETS[preset]["text"],
        "vocab_size": vocab_size,
        "bos_token_id": special_ids["[BOS]"],
        "eos_token_id": special_ids["<|im_end|>"],
        "pad_token_id": special_ids["[PAD]"],
        **(text_overrides or {}),
    }
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "model_type": "kimi_vl",
        "vision_config": vision,
        "text_config": text,
        "ignore_index": -100,
        "media_placeholder_token_id": special_ids["<|media_pad|>"],
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def _write_shards(
    out: Path, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, shard_bytes: int
) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        # the router bias stays fp32, as in the release
        keep = torch.float32 if key.endswith("e_score_correction_bias") else dtype
        shards[-1][key] = _random_tensor(key, shape, seed).to(keep).contiguous()
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    processor_overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 * 1024 * 1024,
) -> Path:
    """Write a checkpoint directory in the official layout and return its path."""
    from services.common.tiny_tokenizer import write_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = write_tiny_tokenizer(out)
    raw = build_config(preset, layout.vocab_size, layout.special_ids, text_overrides, vision_overrides)
    cfg = parse_config(copy.deepcopy(raw))  # reject a contradictory override before writing weights
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    _dump(out / CONFIG_FILE, raw)
    _dump(out / PREPROCESSOR_CONFIG_FILE, {**_PREPROCESSOR, **(processor_overrides or {})})
    stop_ids = [layout.special_ids["<|im_end|>"], layout.special_ids["[EOS]"]]
    _dump(
        out / GENERATION_CONFIG_FILE, {"eos_token_id": stop_ids, "bos_token_id": layout.special_ids["[BOS]"]}
    )
    _write_shards(out, official_weight_shapes(cfg), seed, dtype, shard_bytes)
    return out
