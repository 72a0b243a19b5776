"""CPU threads for torch work, set where the work runs.

OpenMP keeps its thread count per calling thread: `torch.set_num_threads(n)` in a replica's
constructor does not reach a thread started later, which takes `OMP_NUM_THREADS` instead (Ray sets
it to the actor's `num_cpus`, 1 when that is 0). So a stage that computes in a thread of its own
(the decoder's step thread, the encoder's compute thread) sets its count from inside that thread
with `thread_initializer`.

`SPIN_ENV` is what co-located stages run with: an idle OpenMP thread spins for a short while
(`GOMP_SPINCOUNT`, ~20 µs) and then sleeps, so a stage that is waiting does not take cores from
one that is computing, while back-to-back ops inside a step still find their threads awake
(measured in BENCHMARKS.md: the default spin is no faster, a passive wait is 24% slower at batch 1).
"""

from __future__ import annotations

from collections.abc import Callable

SPIN_ENV = {"GOMP_SPINCOUNT": "20000"}


def stage_threads(num_threads: int | None, num_cpus: float, on_cuda: bool) -> int | None:
    """A stage's torch threads: what its settings say, else on CPU the CPUs its replica reserves."""
    if num_threads is not None or on_cuda:
        return num_threads
    return max(1, int(num_cpus))


def thread_initializer(num_threads: int | None) -> Callable[[], None]:
    """A callable that sets torch's intra-op threads for the thread that calls it (None: leave)."""

    def init() -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)

    return init
