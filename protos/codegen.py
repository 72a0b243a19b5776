"""Regenerate the Python gRPC code of the `.proto` files under `protos/kimi_vl/`.

    python -m protos.codegen            # rewrite the committed files in place
    python -m protos.codegen --out DIR  # write them under DIR instead (tests compare the two)

protoc runs from the repository root with `-I .`, so `protos/kimi_vl/v1/x.proto` becomes the module
`protos.kimi_vl.v1.x_pb2` (+ `x_pb2_grpc`, `x_pb2.pyi`) and imports between protos become package
imports that resolve wherever the `protos` package is installed (Ray Serve's proxy imports them).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos") / "kimi_vl"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = REPO_ROOT) -> list[str]:
    """The `.proto` files relative to `root`, sorted so protoc's output does not depend on disk order."""
    return sorted(p.relative_to(root).as_posix() for p in (root / PROTO_DIR).rglob("*.proto"))


def generated_files(root: Path = REPO_ROOT) -> list[str]:
    """Paths (relative to the output root) protoc writes for the current `.proto` files."""
    return [f[: -len(".proto")] + suffix for f in proto_files(root) for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every `.proto` file with `-I .` from `root`; return the files written."""
    from grpc_tools import protoc

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        "-I.",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *proto_files(root),
    ]
    cwd = Path.cwd()
    os.chdir(root)  # `-I .` must be the repository root: it fixes the module names
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"protoc exited with status {code}")
    return [out_dir / f for f in generated_files(root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the Python code of protos/kimi_vl/**.proto")
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
