"""`kimi-vl render-config`: a Serve config made from the shipped one and an overlay, so that a
variant (the CPU stand-in cluster of the tests, a staging cluster) states only what differs and
never drifts from `cluster/pipeline.yaml`.

Merge rules (`overlay_config`), from the top of the two documents down:
- mappings merge key by key; a key whose overlay value is null is removed;
- lists of mappings that all carry `name` (applications, deployments) merge item by item on it,
  and an overlay item with a name the base lacks is appended;
- any other value (lists included) replaces the base's.
`--set PATH=VALUE` then sets one value: PATH is dotted, a list item is addressed by its name
(`applications.kimi-vl.args.redis_url`), VALUE is read as YAML (`8`, `true`, `null`, text).

Pure data: it knows nothing of Serve beyond the shape of its config.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import InvalidInputError

DEFAULT_BASE = Path(__file__).resolve().parents[2] / "cluster" / "pipeline.yaml"


def overlay_config(base: Any, overlay: Any) -> Any:
    """`base` with `overlay` merged in (neither is modified)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = copy.deepcopy(base)
        for key, value in overlay.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = overlay_config(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if _named_list(base) and _named_list(overlay):
        merged = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged)}
        for item in overlay:
            if item["name"] in index:
                merged[index[item["name"]]] = overlay_config(merged[index[item["name"]]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(overlay)


def set_value(config: Any, path: str, value: Any) -> Any:
    """A copy of `config` with the value at dotted `path` set (list items by `name`)."""
    out = copy.deepcopy(config)
    node = out
    keys = path.split(".")
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            matches = [item for item in node if isinstance(item, dict) and item.get("name") == key]
            if not matches:
                raise InvalidInputError(f"--set {path}: no list item named {key!r}")
            if last:
                raise InvalidInputError(f"--set {path}: a list item cannot be replaced whole")
            node = matches[0]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise InvalidInputError(f"--set {path}: {'.'.join(keys[:depth])} is not a mapping or list")
    return out


def render(base_path: Path, overlay_paths: list[Path], sets: list[str]) -> dict[str, Any]:
    config = _load(base_path)
    for path in overlay_paths:
        config = overlay_config(config, _load(path))
    for item in sets:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted:
            raise InvalidInputError(f"--set takes PATH=VALUE, got {item!r}")
        config = set_value(config, dotted, yaml.safe_load(text))
    return config


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def _load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InvalidInputError(f"cannot read {path}: {e}") from e


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "render-config", help="a Serve config from cluster/pipeline.yaml and overlays, for serve deploy"
    )
    p.add_argument(
        "--base", default=str(DEFAULT_BASE), help="the Serve config (default: cluster/pipeline.yaml)"
    )
    p.add_argument(
        "--overlay", action="append", default=[], help="a partial config merged on top (repeatable)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="one value, e.g. applications.kimi-vl.args.redis_url=redis://127.0.0.1:6379/0 (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="write here (default: standard output)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    config = render(Path(args.base), [Path(p) for p in args.overlay], args.set)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
