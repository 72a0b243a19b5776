"""benchmarks/gpu_check.sh, the one command for a lent GPU, says clearly when there is none."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would measure it")
def test_without_a_gpu_it_measures_nothing_and_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no CUDA device here" in result.stderr and "nothing measured" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
