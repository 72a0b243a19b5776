"""Reading service settings from Serve config `args`: the checks every service shares.

Unknown keys are refused by name (a typo in a YAML file must not silently fall back to a
default), and dtype names are checked against the one table in `services.common.devices`.
Knows nothing about Ray or any one service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from services.common.devices import DTYPES
from services.common.errors import InvalidInputError


def known_fields(cls: type, raw: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """`raw` as keyword arguments of dataclass `cls`; InvalidInputError naming any unknown key."""
    raw = raw or {}
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise InvalidInputError(f"unknown {what}(s): {', '.join(unknown)}")
    return dict(raw)


def check_dtype_name(name: Any) -> None:
    """`auto` or a dtype of `DTYPES`, else InvalidInputError."""
    if name not in ("auto", *DTYPES):
        raise InvalidInputError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name}")
