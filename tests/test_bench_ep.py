"""`benchmarks/bench_ep.py` still runs: the tiny preset at EP = 1 and 2 for two steps (a smoke
test of the benchmark's code, not a measurement), and its EP = 8 projection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_ep_runs_and_reports_every_size(tmp_path):
    out = tmp_path / "ep.json"
    bench = str(ROOT / "benchmarks" / "bench_ep.py")
    sizes = ["--preset", "tiny", "--sizes", "1", "2", "--batch", "4", "--steps", "2"]
    subprocess.run([sys.executable, bench, *sizes, "--json", str(out)], check=True, timeout=300)
    report = json.loads(out.read_text())
    assert [r["ep"] for r in report["results"]] == [1, "1 (sharded path)", 2]
    ep2 = report["results"][-1]
    assert ep2["tokens_per_s"] > 0 and ep2["bytes_moved_per_step"] > 0
    projection = report["projection_ep8"]
    # one row per (token, other rank) is fewer rows than one per (token, expert on another rank)
    rows = projection["remote_rows_per_token"]
    assert 3.9 < rows["per_rank"] < rows["per_slot"] == 5.25
