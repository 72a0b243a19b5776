"""How many replicas of each stage `kimi-vl serve` runs on one machine, and how its CPUs are split
between them (`--replicas STAGE=N[,STAGE=N...]`).

Pure arithmetic over the machine's CPU count: it knows nothing of Ray or Serve, and returns plain
figures that `local.py` turns into deployment options.

Two different things are split, and they are split differently:
- **Ray's accounting** (`num_cpus` per replica) decides what can be placed. It must add up to at
  most the machine's CPUs, so several replicas of a stage reserve fractions of its share. The
  decoder keeps the share it had with one replica (all CPUs but one), the encoder gets the rest;
  the ingress and preprocess replicas reserve nothing (they wait on I/O and on the other stages,
  and Serve's own proxies reserve nothing either), so any number of them fits.
- **Torch threads** (what computes) are the stage's cores divided by its replicas, at least one.
  The encoder and the decoder may each use every core while the other waits; when replicas of
  both compute at once they split the cores further at run time (`common/threads.CoreShare`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import InvalidInputError

# the stage names the CLI takes, and the Serve deployment each one is
STAGE_DEPLOYMENTS = {
    "ingress": "ChatIngress",
    "preprocess": "PreprocessServer",
    "encoder": "VisionEncoderServer",
    "decoder": "DecoderServer",
}
COMPUTE_STAGES = ("encoder", "decoder")
MAX_REPLICAS_PER_STAGE = 32  # a local run: beyond this the replicas' start-up alone swamps the cores
_CPU_STEPS = 10_000  # Ray keeps resources to four decimals


@dataclass(frozen=True)
class StageShare:
    """One stage's placement on this machine: per replica, unless named otherwise."""

    replicas: int
    num_cpus: float  # Ray's reservation per replica (0 for the decoder under EP: its ranks reserve)
    torch_threads: int | None  # None: the stage runs no torch compute thread of its own
    rank_cpus: float | None = None  # EP only: each rank actor's reservation

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"replicas": self.replicas, "num_cpus": self.num_cpus}
        if self.torch_threads is not None:
            out["torch_threads"] = self.torch_threads
        if self.rank_cpus is not None:
            out["ep_rank_cpus"] = self.rank_cpus
        return out


def parse_replicas(text: str | None) -> dict[str, int]:
    """`decoder=3,encoder=2` -> {"decoder": 3, "encoder": 2}; a clear error for anything else."""
    if text is None:
        return {}
    out: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        stage, sep, count = item.partition("=")
        stage = stage.strip()
        if not sep or stage not in STAGE_DEPLOYMENTS:
            raise InvalidInputError(
                f"--replicas takes STAGE=N[,STAGE=N...] with STAGE one of "
                f"{', '.join(STAGE_DEPLOYMENTS)}; got {item!r}"
            )
        if stage in out:
            raise InvalidInputError(f"--replicas names {stage} twice")
        try:
            n = int(count.strip())
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_REPLICAS_PER_STAGE:
            raise InvalidInputError(
                f"--replicas {stage}={count.strip()}: N must be a whole number from 1 to "
                f"{MAX_REPLICAS_PER_STAGE}"
            )
        out[stage] = n
    return out


def split_cpus(num_cpus: int, replicas: Mapping[str, int], ep: int = 1) -> dict[str, StageShare]:
    """Every stage's share of `num_cpus` CPUs, with `replicas` (stages not named: one replica) and a
    decoder of `ep` expert-parallel ranks per replica. The reservations add up to at most
    `num_cpus`."""
    if num_cpus < 1:
        raise InvalidInputError(f"the machine needs at least one CPU, got {num_cpus}")
    if ep < 1:
        raise InvalidInputError(f"--ep must be at least 1, got {ep}")
    counts = {stage: int(replicas.get(stage, 1)) for stage in STAGE_DEPLOYMENTS}
    decoder_total = num_cpus - 1 if num_cpus > 1 else num_cpus  # one CPU's worth left to the rest
    encoder_total = num_cpus - decoder_total

    def threads(stage: str) -> int:
        return max(1, num_cpus // counts[stage])

    shares = {
        "ingress": StageShare(counts["ingress"], 0.0, None),
        "preprocess": StageShare(counts["preprocess"], 0.0, None),
        "encoder": StageShare(
            counts["encoder"], _floor(encoder_total / counts["encoder"]), threads("encoder")
        ),
    }
    if ep > 1:  # the ranks hold the decoder's CPUs and compute; the replica only steps them
        rank = _floor(decoder_total / (counts["decoder"] * ep))
        shares["decoder"] = StageShare(counts["decoder"], 0.0, 1, rank_cpus=rank)
    else:
        shares["decoder"] = StageShare(
            counts["decoder"], _floor(decoder_total / counts["decoder"]), threads("decoder")
        )
    return shares


def describe(shares: Mapping[str, StageShare], num_cpus: int) -> str:
    """One line a person reads: what each stage got."""
    parts = []
    for stage, share in shares.items():
        text = f"{stage} {share.replicas}x {share.num_cpus:g} CPU"
        if share.rank_cpus is not None:
            text += f" (EP ranks {share.rank_cpus:g} CPU each)"
        if share.torch_threads is not None:
            text += f", {share.torch_threads} torch thread{'s' if share.torch_threads > 1 else ''}"
        parts.append(text)
    return f"{num_cpus} CPUs: " + "; ".join(parts)


def _floor(value: float) -> float:
    """Down to Ray's resolution, so that N shares never add up to more than the whole."""
    return math.floor(value * _CPU_STEPS + 1e-6) / _CPU_STEPS if value > 0 else 0.0
