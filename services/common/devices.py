"""Where and in which dtype a model runs: the names users and configs write, resolved once.

`auto` device: CUDA when available, else CPU. `auto` dtype: bf16 (the release dtype) on CUDA,
fp32 on CPU, where bf16 matmuls are slower at small sizes and less exact. Pure torch.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]
