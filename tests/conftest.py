"""Session-wide test set-up.

Triton's interpreter must be chosen before `triton` is first imported (transformers may import
it too), so without a GPU it is switched on here, ahead of every test module.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Local Ray instances bind loopback only (tests never reach another address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
