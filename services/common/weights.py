"""Loading official-format safetensors checkpoints into modules built on the meta device.

A model is constructed on `meta` (no memory), its target list is derived from the module tree
(parameter and persistent-buffer names are the checkpoint keys), every problem with the
checkpoint — missing keys, unexpected keys, wrong shapes — is collected and raised as one
`CheckpointError`, and only then is memory allocated and filled tensor by tensor from the
memory-mapped shards. The real 16B checkpoint therefore loads with one copy of the weights in
memory.

A module whose parameters do not map one-to-one onto checkpoint keys (fused MoE experts) speaks
the custom-load protocol: `checkpoint_keys() -> list[str]` (keys relative to the module) and
`load_checkpoint_tensor(name, tensor)`. Knows nothing about what the modules compute.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import torch
from safetensors import safe_open
from torch import nn

from services.common.errors import CheckpointError

if TYPE_CHECKING:
    from services.common.config import KimiVLConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_LISTED = 20

_M = TypeVar("_M", bound=nn.Module)


class CustomLoad(Protocol):
    """The custom-load protocol of a module whose weights are not its checkpoint keys."""

    def checkpoint_keys(self) -> list[str]: ...

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class _Target:
    shape: tuple[int, ...] | None  # None: the custom loader checks the shape itself
    load: Callable[[torch.Tensor], None]


def checkpoint_weight_map(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Key -> shard file, from `model.safetensors.index.json` or a single `model.safetensors`."""
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = {name: root / name for name in set(weight_map.values())}
        absent = sorted(str(p) for p in files.values() if not p.is_file())
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(absent)}")
        return {key: files[name] for key, name in weight_map.items()}
    single = root / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{root} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def _copy_into(module: nn.Module, name: str) -> Callable[[torch.Tensor], None]:
    def load(tensor: torch.Tensor) -> None:
        getattr(module, name).data.copy_(tensor)

    return load


def _custom_load(module: CustomLoad, name: str) -> Callable[[torch.Tensor], None]:
    def load(tensor: torch.Tensor) -> None:
        module.load_checkpoint_tensor(name, tensor)

    return load


@dataclass
class LoadStats:
    """What `load_weights` read from the checkpoint."""

    tensors: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)


def _module_targets(model: nn.Module, prefix: str) -> tuple[dict[str, _Target], set[str]]:
    """Checkpoint key -> how to load it, for every weight the model holds; and the keys a module
    declares present but not its to load (`skipped_checkpoint_keys`: another rank's experts)."""
    targets: dict[str, _Target] = {}
    skipped: set[str] = set()
    custom_roots: list[str] = []
    seen: set[int] = set()  # tied weights are loaded once, under their first name
    for mod_name, mod in model.named_modules():
        path = f"{mod_name}." if mod_name else ""
        if any(path.startswith(root) for root in custom_roots):
            continue
        if hasattr(mod, "checkpoint_keys"):
            custom = cast(CustomLoad, mod)
            custom_roots.append(path)
            for key in custom.checkpoint_keys():
                targets[prefix + path + key] = _Target(None, _custom_load(custom, key))
            skip = getattr(mod, "skipped_checkpoint_keys", None)
            skipped.update(prefix + path + key for key in (skip() if skip is not None else ()))
            continue
        persistent = [
            (n, b) for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set
        ]
        for name, tensor in [*mod.named_parameters(recurse=False), *persistent]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            targets[prefix + path + name] = _Target(tuple(tensor.shape), _copy_into(mod, name))
    return targets, skipped


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" … and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def _validate(
    targets: dict[str, _Target],
    skipped: set[str],
    weight_map: dict[str, Path],
    scope: tuple[str, ...],
    checkpoint_dir: Path,
) -> None:
    available = {k for k in weight_map if k.startswith(scope)}
    missing = sorted((set(targets) | skipped) - available)
    unexpected = sorted(available - set(targets) - skipped)
    wrong: list[str] = []
    for path in sorted({weight_map[k] for k in set(targets) & available}):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                target = targets.get(key)
                if target is None or target.shape is None:
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != target.shape:
                    wrong.append(f"{key} has shape {list(shape)}, expected {list(target.shape)}")
    problems = [
        _listing(title, keys)
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not fit the model: " + "; ".join(problems))


def _progress(items: list[str], enabled: bool) -> Iterator[str]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc="loading weights", unit="tensor")


def load_weights(
    model: _M,
    checkpoint_dir: str | Path,
    *,
    prefix: str = "",
    scope: tuple[str, ...] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    stats: LoadStats | None = None,
) -> _M:
    """Fill `model` (built on the meta device) with the checkpoint's weights (`stats`: counts what
    was read).

    The model's parameter names are the checkpoint keys after `prefix`. `scope` lists the key
    prefixes the model covers (default: `prefix`, i.e. everything when it is empty); keys outside
    it belong to other parts of the model and are not loaded. Raises CheckpointError naming every
    missing, unexpected (within scope) and wrongly shaped key before any memory is allocated.
    Tensors are converted to each parameter's own dtype on copy.
    """
    root = Path(checkpoint_dir)
    weight_map = checkpoint_weight_map(root)
    targets, skipped = _module_targets(model, prefix)
    _validate(targets, skipped, weight_map, scope if scope is not None else (prefix,), root)
    model.to_empty(device=device)
    keys = sorted(targets, key=lambda k: (str(weight_map[k]), k))
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:
        for key in _progress(keys, progress):
            path = weight_map[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            try:
                tensor = handles[path].get_tensor(key)  # type: ignore[attr-defined]
                targets[key].load(tensor)
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"cannot load {key} from {path.name}: {e}") from e
            if stats is not None:
                stats.tensors += 1
                stats.bytes += tensor.numel() * tensor.element_size()
                stats.keys.append(key)
    model.eval()
    return model


@contextlib.contextmanager
def meta_build(dtype: torch.dtype) -> Iterator[None]:
    """Build modules on the meta device with `dtype` as the default float dtype.

    Modules that need another dtype for a weight (the fp32 router bias) ask for it explicitly.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_and_load(
    build: Callable[[KimiVLConfig], _M],
    checkpoint_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    prefix: str = "",
    scope: tuple[str, ...] | None = None,
    progress: bool = False,
    stats: LoadStats | None = None,
) -> _M:
    """Parse the checkpoint's config, build `build(config)` on the meta device, load its weights."""
    from services.common.config import load_config

    cfg = load_config(checkpoint_dir)
    with meta_build(dtype):
        model = build(cfg)
    return load_weights(
        model, checkpoint_dir, prefix=prefix, scope=scope, device=device, progress=progress, stats=stats
    )
