"""The one switch between the Triton kernels and their PyTorch references, and launch checks.

`KIMI_VL_MOE_BACKEND` (named for the MoE layer, the first user; MLA's decode follows it too) picks
the path:
- `auto` (default): kernels on CUDA tensors, references everywhere else;
- `triton`: kernels always; CPU tensors then run under Triton's interpreter, which must have been
  chosen (TRITON_INTERPRET=1) before `triton` was first imported, else the launch raises;
- `torch`: references always.
It is read at every call, so a test or a debugging session can flip it without reloading.

Triton is a Linux-only dependency. Where it is missing the kernel modules still import (their
`@triton.jit` bodies are defined but never compiled), the references run, and launching a kernel
raises. Knows nothing about what the kernels compute.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test that hides triton

    class _NoTriton:
        """Stands in for `triton`: kernels can be defined (annotations are strings), not launched."""

        @staticmethod
        def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn

    triton = _NoTriton()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

BACKEND_ENV = "KIMI_VL_MOE_BACKEND"
BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "HAVE_TRITON",
    "check_launch",
    "is_interpreted",
    "moe_backend",
    "tl",
    "triton",
    "use_kernels",
]


def moe_backend() -> str:
    """The requested backend, validated: one of `BACKENDS`."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the MoE layer runs the Triton kernels on `x` (True) or the PyTorch references."""
    backend = moe_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return HAVE_TRITON and x.is_cuda
    return True  # forced: an impossible launch raises in `check_launch` with the reason


def is_interpreted(kernel: object) -> bool:
    """Whether `kernel` runs under Triton's interpreter (fixed when its module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(kernel: object, *tensors: torch.Tensor) -> None:
    """Raise a clear error if `kernel` cannot run on `tensors`. Every host wrapper calls this first."""
    if not HAVE_TRITON:
        raise RuntimeError(
            f"Triton is not installed: use the *_ref functions or {BACKEND_ENV}=torch for the MoE layer"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors on different devices: {sorted(str(d) for d in devices)}")
    # the interpreter copies any tensor to host memory; compiled kernels need the GPU
    if is_interpreted(kernel):
        return
    device = devices.pop()
    if device.type != "cuda":
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got {device}. To run them on CPU under Triton's "
            "interpreter set TRITON_INTERPRET=1 before triton is first imported; "
            f"{BACKEND_ENV}=torch selects the PyTorch references instead."
        )
