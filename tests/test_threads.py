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
from pathlib import Path

from services.common.threads import SPIN_ENV
from services.pipeline.local import app_args

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import ctypes, threading, torch
from concurrent.futures import ThreadPoolExecutor
from services.common.threads import thread_initializer
from services.decoder.engine.async_engine import AsyncEngine

maps = open("/proc/self/maps").read().split()
gomp = ctypes.CDLL(next(p for p in maps if "libgomp" in p))

def omp_threads():
    return gomp.omp_get_max_threads()

torch.set_num_threads(2)  # in the constructor, as a replica does: it does not reach new threads
plain = []
t = threading.Thread(target=lambda: plain.append(omp_threads())); t.start(); t.join()
with ThreadPoolExecutor(1, initializer=thread_initializer(2)) as pool:  # the encoder's compute thread
    encoder = pool.submit(omp_threads).result()

class Core:  # an EngineCore with nothing to do; the probe runs in the step thread
    def has_unfinished(self): return False
    def stats(self): return None
    def shutdown(self): pass

seen = []
engine = AsyncEngine(Core(), thread_init=lambda: (thread_initializer(2)(), seen.append(omp_threads())))
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
        config=None, redis=None, served_model_name=None, api_key=None, device=None, ep=1
    )
    out = app_args(args, Path("ck"), num_cpus=4)
    assert out["encoder"]["num_threads"] == 4 and out["decoder"]["num_threads"] == 4
    for name, options in out["deployment_options"].items():
        assert options["ray_actor_options"]["runtime_env"]["env_vars"] == SPIN_ENV, name
    sharded = app_args(argparse.Namespace(**{**vars(args), "ep": 2}), Path("ck"), num_cpus=4)
    assert sharded["decoder"]["num_threads"] == 1  # the ranks compute; the replica only steps them
