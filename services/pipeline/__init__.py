"""The whole Kimi-VL service as one Serve application: `services.pipeline:build_app`."""

from services.pipeline.app import build_app

__all__ = ["build_app"]
