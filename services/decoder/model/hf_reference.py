"""Exporting a checkpoint's decoder as a `transformers` DeepSeek-V3 checkpoint.

The independent reference for the decoder is `transformers.DeepseekV3ForCausalLM` loaded from
the same `language_model.*` tensors. This module writes what it needs — a DeepSeek-V3
config.json (rope settings as transformers 5 reads them, `rope_interleave` on) and the
tensors with the prefix stripped, experts per expert as the release stores them — and loads it.
Used by the golden tests and the benchmarks; the serving path never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.weights import checkpoint_weight_map

PREFIX = "language_model."


def hf_text_config(text: dict[str, Any]) -> dict[str, Any]:
    """A Kimi-VL `text_config` dict as a transformers 5 `DeepseekV3Config` dict."""
    hf = {k: v for k, v in text.items() if k not in ("rope_theta", "rope_scaling")}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": text["rope_theta"]}
    if text.get("rope_scaling"):
        # transformers 5 reads rope settings from `rope_parameters` (rope_type, not type)
        scaling = {k: v for k, v in text["rope_scaling"].items() if k != "type"}
        rope = {**rope, **scaling, "rope_type": "yarn"}
    hf.update(model_type="deepseek_v3", rope_interleave=True, rope_parameters=rope)
    return hf


def export_hf_decoder(checkpoint_dir: str | Path, out_dir: str | Path, *, eos: bool = True) -> Path:
    """Write the decoder as a transformers DeepSeek-V3 checkpoint; `eos=False` drops the stop ids."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    text = json.loads((src / "config.json").read_text())["text_config"]
    config = hf_text_config(text)
    if not eos:
        config.update(bos_token_id=None, eos_token_id=None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(checkpoint_weight_map(src).values())):
        tensors.update(
            {k.removeprefix(PREFIX): v for k, v in load_file(shard).items() if k.startswith(PREFIX)}
        )
    save_file(tensors, str(out / "model.safetensors"))
    return out


def load_hf_decoder(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()  # type: ignore[no-untyped-call]  # transformers: PreTrainedModel.eval is unannotated
    return model
