"""Torch threads are set where the work runs, and co-located stages share the cores.

OpenMP's thread count is per calling thread, so these run in a fresh interpreter with
`OMP_NUM_THREADS=1`, as Ray starts its workers, and ask the OpenMP runtime torch loaded for the
calling thread's `omp_get_max_threads` (what MKL's GEMMs use; asking torch would first repair
the count for ATen's own loops and hide the trap).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from services.common.threads import SHARE_ENV, SPIN_ENV, ComputeThreads, CoreShare, compute_threads
from services.pipeline.local import app_args

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import ctypes, threading, torch
from concurrent.futures import ThreadPoolExecutor
from services.common.threads import ComputeThreads
from services.decoder.engine.async_engine import AsyncEngine

maps = open("/proc/self/maps").read().split()
gomp = ctypes.CDLL(next(p for p in maps if "libgomp" in p))

def omp_threads():
    return gomp.omp_get_max_threads()

torch.set_num_threads(2)  # in the constructor, as a replica does: it does not reach new threads
plain = []
t = threading.Thread(target=lambda: plain.append(omp_threads())); t.start(); t.join()
with ThreadPoolExecutor(1, initializer=ComputeThreads(2).init) as pool:  # the encoder's compute thread
    encoder = pool.submit(omp_threads).result()

class Core:  # an EngineCore with nothing to do; the probe runs in the step thread
    def has_unfinished(self): return False
    def stats(self): return None
    def shutdown(self): pass

seen = []
class Probe(ComputeThreads):  # what the step thread runs first
    def init(self):
        super().init()
        seen.append(omp_threads())

engine = AsyncEngine(Core(), threads=Probe(2))
engine._join()
print(plain[0], encoder, seen[0])
"""


def test_compute_threads_take_the_stage_count_where_ray_says_one() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    plain, encoder, decoder = map(int, result.stdout.split()[-3:])
    assert plain == 1  # the trap: a thread started later runs on OMP_NUM_THREADS
    assert (encoder, decoder) == (2, 2)


def test_kimi_vl_serve_gives_each_compute_stage_every_core() -> None:
    args = argparse.Namespace(
        config=None,
        redis=None,
        served_model_name=None,
        api_key=None,
        device=None,
        ep=1,
        replicas=None,
        autoscale=False,
    )
    out = app_args(args, Path("ck"), num_cpus=4)
    assert out["encoder"]["num_threads"] == 4 and out["decoder"]["num_threads"] == 4
    for name, options in out["deployment_options"].items():
        assert options["ray_actor_options"]["runtime_env"]["env_vars"] == SPIN_ENV, name
    sharded = app_args(argparse.Namespace(**{**vars(args), "ep": 2}), Path("ck"), num_cpus=4)
    assert sharded["decoder"]["num_threads"] == 1  # the ranks compute; the replica only steps them


def test_busy_stages_split_the_cores_and_take_them_back(tmp_path: Path) -> None:
    board = tmp_path / "board"
    decoder, encoder = CoreShare(board), CoreShare(board)
    threads = ComputeThreads(4, decoder)

    def step() -> int:  # a decode step, in the stage's compute thread
        with threads.computing():
            return torch.get_num_threads()

    with ThreadPoolExecutor(1, initializer=threads.init) as pool:
        alone = pool.submit(step).result()
        encoder.set_busy(True)  # the encoder starts a pass
        shared = pool.submit(step).result()
        encoder.set_busy(False)
        again = pool.submit(step).result()
    assert (alone, shared, again) == (4, 2, 4)
    assert decoder.busy_count() == 0  # idle between steps
    decoder.close()
    encoder.close()


def test_a_dead_owners_slot_is_not_counted_and_is_reclaimed(tmp_path: Path) -> None:
    board = tmp_path / "board"
    probe = (
        "from pathlib import Path; from services.common.threads import CoreShare; "
        f"s = CoreShare(Path({str(board)!r})); s.set_busy(True); print(s.busy_count())"
    )  # exits while busy, without closing its slot (a killed replica)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]
    share = CoreShare(board)
    assert share.busy_count() == 0
    assert share._slot == 0  # the dead owner's slot
    share.close()


def test_the_share_is_off_where_it_cannot_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    board = tmp_path / "board"
    monkeypatch.setenv(SHARE_ENV, str(board))
    shared = compute_threads(2, share_cores=True, on_cuda=False)
    assert shared.share is not None and shared.share.path == board
    assert compute_threads(2, share_cores=False, on_cuda=False).share is None
    assert compute_threads(2, share_cores=True, on_cuda=True).share is None  # GPU work: no CPU team
    assert compute_threads(None, share_cores=True, on_cuda=False).share is None  # torch's own count
    others = [CoreShare(board) for _ in range(63)]
    full = compute_threads(2, share_cores=True, on_cuda=False)  # the 65th: a warning, the whole count
    assert full.share is None and full.num_threads == 2
    monkeypatch.setenv(SHARE_ENV, "off")
    assert compute_threads(2, share_cores=True, on_cuda=False).share is None
    for share in [shared.share, *others]:
        share.close()
