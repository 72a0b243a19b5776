"""The import structure `docs/architecture.md` draws, held against the code.

- Every package imports only the packages below it (the table here is the page's table).
- No module imports itself back through others (no cycles, lazy imports included).
- The pure cores import no Ray, gRPC or Redis, and the ingress (a replica that only speaks HTTP
  and gRPC) imports no torch, no OpenCV and no model code: both checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("services", "protos", "triton_kernels")

# package -> the packages it may import (besides itself); the decoder counts as its sub-packages
MAY_IMPORT: dict[str, set[str]] = {
    "protos": set(),
    "triton_kernels": set(),
    "services.common": {"protos"},
    "services.scaling": set(),  # pure policies and their Serve seams: the stages' shims import them
    "services.preprocess": {"services.common", "services.scaling", "protos"},
    "services.vision_encoder": {"services.common", "services.scaling", "protos"},
    "services.decoder": set(),  # the package's docstring only
    "services.decoder.model": {"services.common", "triton_kernels"},
    "services.decoder.engine": {"services.common", "services.decoder.model"},
    # sharding sits on the model and below loading; the rank group (group.py) sits on the engine
    "services.decoder.loading": {
        "services.common",
        "services.decoder.model",
        "services.decoder.expert_parallel",
    },
    "services.decoder.expert_parallel": {
        "services.common",
        "services.decoder.model",
        "services.decoder.engine",
        "services.decoder.loading",
    },
    "services.decoder.service": {
        "protos",
        "services.common",
        "services.scaling",
        "services.vision_encoder",
        "services.decoder.model",
        "services.decoder.engine",
        "services.decoder.expert_parallel",
        "services.decoder.loading",
    },
    "services.frontend": {"services.common", "services.preprocess", "services.decoder.engine"},
    "services.kimi_vl": {"services.common", "services.vision_encoder", "services.decoder.model"},
    "services.offline": {
        "services.common",
        "services.preprocess",
        "services.decoder.engine",
        "services.kimi_vl",
    },
    "services.loadtest": {"services.common"},
    "services.pipeline": {
        "protos",
        "services.common",
        "services.scaling",
        "services.preprocess",
        "services.vision_encoder",
        "services.decoder.engine",
        "services.decoder.service",
        "services.frontend",
    },
}
TOP = {"services.cli", "services"}  # the command line may import anything

PURE_CORES = [
    "services.decoder.model.decoder",
    "services.decoder.model.compiled",
    "services.decoder.engine.llm_engine",
    "services.decoder.engine.async_engine",
    "services.decoder.expert_parallel.sharding",
    "services.decoder.expert_parallel.placement",
    "services.decoder.loading",
    "services.preprocess.core",
    "services.preprocess.settings",
    "services.vision_encoder.engine",
    "services.vision_encoder.model",
    "services.frontend.openai_convert",
    "services.frontend.openai_responses",
    "services.common.chat_template",
    "services.common.weights",
    "services.kimi_vl",
    "services.offline",
    "services.scaling.policies",
    "services.scaling.serve_policies",
    "services.scaling.routing",
    "services.pipeline.replicas",
]


def _modules() -> Iterator[tuple[str, Path]]:
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update({node.module} | {f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {name for name in out if name.split(".")[0] in OURS}


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "services" or len(parts) == 1:
        return parts[0] if parts[0] != "services" else "services"
    depth = 3 if parts[1] == "decoder" and len(parts) > 2 else 2
    return ".".join(parts[:depth])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = dict(_modules())
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_every_import_points_down(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, imported in graph.items():
        source = _package(module)
        if source in TOP:
            continue
        assert source in MAY_IMPORT, f"{module}: its package {source} is not in the table"
        for target in imported:
            dest = _package(target)
            if dest != source and dest not in MAY_IMPORT[source]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ naming its own modules is not a cycle worth reporting
    real = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not real, "\n".join(" -> ".join(c) for c in real)


def _loaded_after(imports: list[str]) -> set[str]:
    code = f"import importlib, json, sys\nfor m in {imports!r}: importlib.import_module(m)\n"
    code += "print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_pure_cores_import_no_ray_grpc_or_redis() -> None:
    loaded = _loaded_after(PURE_CORES)
    assert not {m.split(".")[0] for m in loaded} & {"ray", "grpc", "redis"}


def test_the_ingress_imports_no_torch_and_no_model() -> None:
    # the decoder's request router runs where its handles are: in the ingress
    loaded = _loaded_after(["services.pipeline.ingress", "services.decoder.service.router"])
    assert "torch" not in loaded and "cv2" not in loaded
    assert not [
        m for m in loaded if m.startswith(("services.decoder.model", "services.decoder.engine.llm_engine"))
    ]
    assert not [m for m in loaded if m.startswith("services.vision_encoder.model")]


def test_the_encoder_imports_no_decoder() -> None:
    loaded = _loaded_after(["services.vision_encoder.server"])
    assert not [m for m in loaded if m.startswith("services.decoder")]
