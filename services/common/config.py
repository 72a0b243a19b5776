"""Kimi-VL configuration: the checkpoint's `config.json` and `preprocessor_config.json`, parsed once.

Field names are the Hugging Face keys, spelled as the checkpoint spells them. Keys that decide the
architecture are required: a config without them is rejected with an error naming every missing
key. Keys the published configs sometimes omit fall back to the documented DeepSeek-V3 / MoonViT
defaults listed in `_TEXT_OPTIONAL` / `_VISION_OPTIONAL` — the one place those defaults live.
Contradictory values (heads not dividing the width, more groups than experts ...) are rejected.

Knows nothing about weights, tokenizers or devices.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from services.common.errors import CheckpointError

CONFIG_FILE = "config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class RopeScaling:
    """DeepSeek YaRN rope scaling (`rope_scaling` with type/rope_type `yarn`)."""

    type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class VisionConfig:
    """MoonViT (`vision_config`)."""

    patch_size: int
    init_pos_emb_height: int
    init_pos_emb_width: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    merge_kernel_size: tuple[int, int]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_dim(self) -> int:
        """Width of one merged token entering the projector (kernel area × hidden)."""
        return self.merge_kernel_size[0] * self.merge_kernel_size[1] * self.hidden_size


@dataclass(frozen=True)
class TextConfig:
    """The DeepSeek-V3-architecture decoder (`text_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    routed_scaling_factor: float
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    v_head_dim: int
    qk_nope_head_dim: int
    topk_method: str
    n_group: int
    topk_group: int
    num_experts_per_tok: int
    moe_layer_freq: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    scoring_func: str
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer by MLA: compressed kv + shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(scale: float, mscale: float) -> float:
    """DeepSeek's YaRN attention magnitude correction: 0.1·m·ln(s) + 1 for s > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ProcessorConfig:
    """The image processor settings (`preprocessor_config.json`)."""

    patch_size: int
    merge_kernel_size: tuple[int, int]
    in_token_limit: int
    pad_input: bool
    num_pooled_tokens: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def pad_multiple(self) -> tuple[int, int]:
        """(height, width) multiples an image is padded to: patch × merge kernel."""
        return (
            self.patch_size * self.merge_kernel_size[0],
            self.patch_size * self.merge_kernel_size[1],
        )


@dataclass(frozen=True)
class KimiVLConfig:
    """The whole model (`config.json` of model type `kimi_vl`)."""

    vision_config: VisionConfig
    text_config: TextConfig
    media_placeholder_token_id: int
    model_type: str = "kimi_vl"
    # the model's name as transformers records it on saving (`_name_or_path`, e.g.
    # "moonshotai/Kimi-VL-A3B-Thinking-2506"); None when the checkpoint does not say
    name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# Documented defaults for keys a published config may omit (DeepSeek-V3 / MoonViT class defaults).
_TEXT_OPTIONAL: dict[str, Any] = {
    "q_lora_rank": None,
    "topk_method": "noaux_tc",
    "n_group": 1,
    "topk_group": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
_VISION_OPTIONAL: dict[str, Any] = {"merge_kernel_size": (2, 2)}
_PROCESSOR_OPTIONAL: dict[str, Any] = {
    "merge_kernel_size": (2, 2),
    "in_token_limit": 4096,
    "pad_input": True,
    "num_pooled_tokens": 1024,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
}
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_SCORING_FUNCS = ("sigmoid", "softmax")


def _take(cls: type, raw: dict[str, Any], optional: dict[str, Any], where: str) -> dict[str, Any]:
    """Pick the dataclass's fields out of `raw`, filling documented defaults, naming what is missing."""
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in raw and n not in optional]
    if missing:
        raise CheckpointError(f"{where}: missing required key(s): {', '.join(missing)}")
    return {n: raw[n] if n in raw else optional[n] for n in names}


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {message}")


def _parse_rope_scaling(raw: Any, where: str) -> RopeScaling | None:
    if raw is None:
        return None
    _check(isinstance(raw, dict), where, "rope_scaling must be an object or null")
    kind = raw.get("type", raw.get("rope_type"))
    if kind in (None, "default"):
        return None
    _check(kind == "yarn", where, f"rope_scaling type {kind!r} is not supported (only yarn)")
    for key in ("factor", "original_max_position_embeddings"):
        _check(key in raw, where, f"rope_scaling of type yarn needs {key!r}")
    known = {f.name for f in fields(RopeScaling)} - {"type"}
    return RopeScaling(type="yarn", **{k: raw[k] for k in known if k in raw})


def parse_vision_config(raw: dict[str, Any]) -> VisionConfig:
    where = "config.json vision_config"
    values = _take(VisionConfig, raw, _VISION_OPTIONAL, where)
    values["merge_kernel_size"] = tuple(values["merge_kernel_size"])
    cfg = VisionConfig(**values)
    _check(len(cfg.merge_kernel_size) == 2, where, "merge_kernel_size must have two entries")
    _check(
        cfg.hidden_size % cfg.num_attention_heads == 0,
        where,
        f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}",
    )
    _check(cfg.head_dim % 4 == 0, where, f"head_dim {cfg.head_dim} must be a multiple of 4 (2D rope)")
    return cfg


def parse_text_config(raw: dict[str, Any]) -> TextConfig:
    where = "config.json text_config"
    values = _take(TextConfig, raw, _TEXT_OPTIONAL, where)
    values["rope_scaling"] = _parse_rope_scaling(values["rope_scaling"], where)
    cfg = TextConfig(**values)
    _check(cfg.topk_method in _TOPK_METHODS, where, f"topk_method {cfg.topk_method!r} not in {_TOPK_METHODS}")
    _check(
        cfg.scoring_func in _SCORING_FUNCS,
        where,
        f"scoring_func {cfg.scoring_func!r} not in {_SCORING_FUNCS}",
    )
    _check(cfg.hidden_act == "silu", where, f"hidden_act {cfg.hidden_act!r} is not supported (only silu)")
    if cfg.n_routed_experts > 0:
        _check(
            cfg.n_routed_experts % cfg.n_group == 0,
            where,
            f"n_routed_experts {cfg.n_routed_experts} is not divisible by n_group {cfg.n_group}",
        )
        _check(
            1 <= cfg.topk_group <= cfg.n_group,
            where,
            f"topk_group {cfg.topk_group} must be in [1, n_group={cfg.n_group}]",
        )
        _check(
            1 <= cfg.num_experts_per_tok <= cfg.topk_group * cfg.n_routed_experts // cfg.n_group,
            where,
            f"num_experts_per_tok {cfg.num_experts_per_tok} exceeds the experts of the kept groups",
        )
        _check(cfg.moe_layer_freq >= 1, where, "moe_layer_freq must be >= 1")
    _check(cfg.qk_rope_head_dim % 2 == 0, where, "qk_rope_head_dim must be even")
    _check(
        cfg.first_k_dense_replace <= cfg.num_hidden_layers,
        where,
        "first_k_dense_replace exceeds num_hidden_layers",
    )
    return cfg


def parse_config(raw: dict[str, Any]) -> KimiVLConfig:
    """Parse a `config.json` dict of model type `kimi_vl`."""
    for key in ("vision_config", "text_config", "media_placeholder_token_id"):
        _check(key in raw, "config.json", f"missing required key: {key}")
    _check(
        raw.get("model_type", "kimi_vl") == "kimi_vl",
        "config.json",
        f"model_type {raw.get('model_type')!r} is not 'kimi_vl'",
    )
    vision = parse_vision_config(raw["vision_config"])
    text = parse_text_config(raw["text_config"])
    pad_id = raw["media_placeholder_token_id"]
    _check(
        0 <= pad_id < text.vocab_size,
        "config.json",
        f"media_placeholder_token_id {pad_id} is outside the vocabulary ({text.vocab_size})",
    )
    name = raw.get("_name_or_path")
    return KimiVLConfig(
        vision_config=vision,
        text_config=text,
        media_placeholder_token_id=pad_id,
        name_or_path=name if isinstance(name, str) and name else None,
        raw=raw,
    )


def parse_processor_config(raw: dict[str, Any], vision: VisionConfig | None = None) -> ProcessorConfig:
    where = PREPROCESSOR_CONFIG_FILE
    _check("patch_size" in raw, where, "missing required key: patch_size")
    values = _take(ProcessorConfig, raw, _PROCESSOR_OPTIONAL, where)
    for key in ("merge_kernel_size", "image_mean", "image_std"):
        values[key] = tuple(float(v) if key != "merge_kernel_size" else int(v) for v in values[key])
    cfg = ProcessorConfig(**values)
    _check(len(cfg.image_mean) == 3 and len(cfg.image_std) == 3, where, "image_mean/std need 3 values")
    _check(all(s > 0 for s in cfg.image_std), where, "image_std values must be positive")
    _check(cfg.in_token_limit > 0, where, "in_token_limit must be positive")
    if vision is not None:
        _check(
            cfg.patch_size == vision.patch_size,
            where,
            f"patch_size {cfg.patch_size} contradicts vision_config.patch_size {vision.patch_size}",
        )
        _check(
            cfg.merge_kernel_size == vision.merge_kernel_size,
            where,
            f"merge_kernel_size {cfg.merge_kernel_size} contradicts vision_config {vision.merge_kernel_size}",
        )
    return cfg


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_config(checkpoint_dir: str | Path) -> KimiVLConfig:
    return parse_config(_read_json(Path(checkpoint_dir) / CONFIG_FILE))


def load_processor_config(checkpoint_dir: str | Path, vision: VisionConfig | None = None) -> ProcessorConfig:
    return parse_processor_config(_read_json(Path(checkpoint_dir) / PREPROCESSOR_CONFIG_FILE), vision)


@dataclass(frozen=True)
class GenerationConfig:
    """`generation_config.json`: the sampling the checkpoint recommends and its end-of-text ids.
    Field names are transformers' keys; None: the checkpoint says nothing."""

    eos_token_id: tuple[int, ...] | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


def parse_generation_config(raw: dict[str, Any]) -> GenerationConfig:
    where = GENERATION_CONFIG_FILE
    eos = raw.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else eos
    _check(
        ids is None or (isinstance(ids, list) and all(isinstance(i, int) and i >= 0 for i in ids)),
        where,
        f"eos_token_id must be a token id or a list of them, got {eos!r}",
    )
    numbers: dict[str, Any] = {}
    for f in fields(GenerationConfig):
        if f.name in ("eos_token_id", "do_sample") or raw.get(f.name) is None:
            continue
        value = raw[f.name]
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            where,
            f"{f.name} must be a number, got {value!r}",
        )
        numbers[f.name] = value
    do_sample = raw.get("do_sample")
    _check(
        do_sample is None or isinstance(do_sample, bool),
        where,
        f"do_sample must be a boolean, got {do_sample!r}",
    )
    return GenerationConfig(eos_token_id=None if ids is None else tuple(ids), do_sample=do_sample, **numbers)


def load_generation_config(checkpoint_dir: str | Path) -> GenerationConfig:
    """The checkpoint's generation config; one without the file recommends nothing."""
    path = Path(checkpoint_dir) / GENERATION_CONFIG_FILE
    return parse_generation_config(_read_json(path)) if path.is_file() else GenerationConfig()


def load_stop_token_ids(checkpoint_dir: str | Path, text: TextConfig) -> tuple[int, ...]:
    """Token ids that end generation: the generation config's eos ids, else the text config's."""
    eos = load_generation_config(checkpoint_dir).eos_token_id
    if eos is not None:
        return eos
    if text.eos_token_id is None:
        return ()
    return tuple(text.eos_token_id) if isinstance(text.eos_token_id, list) else (int(text.eos_token_id),)
