"""CPU threads for torch work, set where the work runs.

OpenMP keeps its thread count per calling thread: `torch.set_num_threads(n)` in a replica's
constructor does not reach a thread started later, which takes `OMP_NUM_THREADS` instead (Ray sets
it to the actor's `num_cpus`, 1 when that is 0). So a stage that computes in a thread of its own
(the decoder's step thread, the encoder's compute thread) sets its count from inside that thread
(`ComputeThreads.init`).

Stages on one machine share its cores: when the encoder and the decoder compute at the same moment,
each running a full team of threads puts twice as many threads as cores on them, and every
OpenMP barrier then waits for a thread the kernel has parked. `CoreShare` is a board they meet on
(a small shared file, one slot per compute thread): each marks itself busy around a unit of work
and takes `threads // busy` threads, re-read at each decode step and each encoder block.

`SPIN_ENV` is what co-located stages run with: an idle OpenMP thread spins for a short while
(`GOMP_SPINCOUNT`, ~20 µs) and then sleeps, so a stage that is waiting does not take cores from
one that is computing, while back-to-back ops inside a step still find their threads awake
(measured in BENCHMARKS.md: the default spin is no faster, a passive wait is 24% slower at batch 1).

`WORKER_NICENESS_ENV` is what a Ray node serving this pipeline starts with. Ray starts its workers,
every replica among them, at nice 15, while its own daemons (GCS, raylet, agents) run at 0: each
wakeup of a daemon then preempts a compute thread at once, and a preempted OpenMP thread stalls its
whole team at the next barrier. An unprivileged process cannot lower its nice value back, so it
has to be set where the node starts (`kimi-vl serve` does; a cluster sets it on `ray start`).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

SPIN_ENV = {"GOMP_SPINCOUNT": "20000"}
WORKER_NICENESS_ENV = {"RAY_worker_niceness": "0"}  # read by the raylet when the node starts


def stage_threads(num_threads: int | None, num_cpus: float, on_cuda: bool) -> int | None:
    """A stage's torch threads: what its settings say, else on CPU the CPUs its replica reserves."""
    if num_threads is not None or on_cuda:
        return num_threads
    return max(1, int(num_cpus))


# --- co-located stages splitting the cores -------------------------------------------------------

_SLOTS = 64
_SLOT = struct.Struct("qq")  # owner pid (0: free), busy (1) or idle (0)
SHARE_ENV = "KIMI_VL_CORE_SHARE"  # the board's path, or "off"


def default_share_path() -> Path | None:
    """Where this machine's stages meet (`KIMI_VL_CORE_SHARE`, else one file per user in
    /dev/shm or the temp folder); None when the variable says off."""
    value = os.environ.get(SHARE_ENV, "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return root / f"kimi-vl-cores-{os.getuid()}"


class CoreShare:
    """A board that the compute threads of one machine share, so stages busy at the same moment
    split its cores instead of each running a full team of spinning OpenMP threads on them.

    The board is a small file mapped into every process (64 slots of owner pid and busy flag).
    Each compute thread claims one slot (under a file lock; a dead owner's slot is reclaimed),
    marks it busy around each unit of work, and reads how many slots are busy: its share of
    `threads` is `threads // busy` (at least 1). Plain reads and writes of one's own slot need no
    lock: a count read mid-update is at worst one unit of work out of date.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _SLOTS * _SLOT.size:
                    os.ftruncate(fd, _SLOTS * _SLOT.size)
                self._map = mmap.mmap(fd, _SLOTS * _SLOT.size)
                self._slot = self._claim()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _claim(self) -> int:
        for slot in range(_SLOTS):
            pid, _ = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if pid == 0 or not _alive(pid):
                _SLOT.pack_into(self._map, slot * _SLOT.size, os.getpid(), 0)
                return slot
        raise RuntimeError(f"{self.path}: all {_SLOTS} compute slots are taken")

    def set_busy(self, busy: bool) -> None:
        _SLOT.pack_into(self._map, self._slot * _SLOT.size, os.getpid(), int(busy))

    def busy_count(self) -> int:
        """Busy slots of live processes (this one's included when it is busy)."""
        count = 0
        for slot in range(_SLOTS):
            pid, busy = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if busy and (slot == self._slot or _alive(pid)):
                count += 1
        return count

    def close(self) -> None:
        if not self._map.closed:
            _SLOT.pack_into(self._map, self._slot * _SLOT.size, 0, 0)
            self._map.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ComputeThreads:
    """The torch threads of one stage's compute thread: `num_threads` (None: leave torch's), split
    with the machine's other busy compute threads when a `CoreShare` is given.

    Call `init()` first in the compute thread, wrap each unit of work (a decode step, an encoder
    pass) in `computing()`, and call `refresh()` at points inside a long unit (the encoder's
    blocks) to take up cores another stage has released, or give some back.
    """

    def __init__(self, num_threads: int | None, share: CoreShare | None = None) -> None:
        self.num_threads = num_threads
        self.share = share if num_threads else None
        self.current: int | None = None

    def init(self) -> None:
        self._set(self.num_threads)

    @contextmanager
    def computing(self) -> Iterator[None]:
        if self.share is None:
            yield
            return
        self.share.set_busy(True)
        try:
            self.refresh()
            yield
        finally:
            self.share.set_busy(False)

    def refresh(self) -> None:
        if self.share is not None and self.num_threads:
            self._set(max(1, self.num_threads // max(1, self.share.busy_count())))

    def _set(self, n: int | None) -> None:
        if n and n != self.current:
            import torch

            torch.set_num_threads(n)
            self.current = n

    def close(self) -> None:
        if self.share is not None:
            self.share.close()


def compute_threads(num_threads: int | None, share_cores: bool, on_cuda: bool) -> ComputeThreads:
    """A stage's `ComputeThreads`: on CPU with `share_cores`, on this machine's board (a board that
    cannot be opened or is full leaves the stage its whole count, with a warning)."""
    path = default_share_path() if share_cores and not on_cuda and num_threads else None
    share = None
    if path is not None:
        try:
            share = CoreShare(path)
        except (OSError, RuntimeError) as e:
            logger.warning("not sharing cores with co-located stages: %s", e)
    return ComputeThreads(num_threads, share)
