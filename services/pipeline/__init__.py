"""The whole Kimi-VL service as one Serve application: `services.pipeline:build_app`.

`build_app` is looked up lazily, so a replica that imports one module of this package (the
ingress, say) does not import every stage's code with it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from services.pipeline.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
