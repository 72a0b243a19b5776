"""How many replicas of each stage `kimi-vl serve` runs on one machine, and how its CPUs are split
between them (`--replicas STAGE=N[,STAGE=N...]`, `--autoscale`).

Plain figures over the machine's CPUs and memory and a checkpoint's size (read from the
safetensors headers): it knows nothing of Ray or Serve, and `local.py` turns its `Placement` into
deployment options.

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

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class StageCap:
    """The most replicas of a stage `--autoscale` lets Serve run here, and why that many."""

    max_replicas: int
    reason: str


def autoscale_caps(
    num_cpus: int,
    configured_max: Mapping[str, int],
    memory_bytes: int,
    replica_bytes: Mapping[str, int],
) -> dict[str, StageCap]:
    """Each stage's `max_replicas` on this machine: the config's, cut to one replica per CPU (a
    replica of any stage needs a core's worth of work to be worth its start-up) and, for the
    stages that hold a model (`replica_bytes`: weights, KV cache, a process), to what `memory_bytes`
    holds, less a fifth for Ray's own processes and the page cache. The decoder is sized first,
    next to one encoder; the encoder gets what the decoder's cap leaves."""
    caps: dict[str, StageCap] = {}
    left = memory_bytes * 4 // 5
    for stage in ("decoder", "encoder", "ingress", "preprocess"):
        configured = max(1, int(configured_max.get(stage, 1)))
        limits = [(configured, f"config max {configured}"), (num_cpus, f"{num_cpus} CPUs")]
        size = replica_bytes.get(stage)
        if size:
            others = sum(replica_bytes.get(s, 0) for s in COMPUTE_STAGES if s != stage and s not in caps)
            fit = max(1, (left - others) // size)
            limits.append((fit, f"memory for {fit} at {size / 2**30:.1f} GiB each of {left / 2**30:.1f} GiB"))
        cap = min(n for n, _ in limits)
        binding = next(why for n, why in limits if n == cap)
        rest = [why for _, why in limits if why != binding]
        caps[stage] = StageCap(cap, binding + (f" (and {'; '.join(rest)})" if rest else ""))
        if size:
            left -= cap * size
    return {stage: caps[stage] for stage in STAGE_DEPLOYMENTS}


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


@dataclass(frozen=True)
class Placement:
    """What `kimi-vl serve` runs of each stage: its CPU share per replica, and either a fixed count
    (`shares[stage].replicas`) or Serve's autoscaling between 1 and its cap (`scaling`)."""

    shares: dict[str, StageShare]
    scaling: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> autoscaling_config
    caps: dict[str, StageCap] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stage, for the ready line: replicas (or the autoscaling range and its cap's reason),
        CPUs and torch threads per replica."""
        out = {}
        for stage, share in self.shares.items():
            entry = share.as_dict()
            if stage in self.scaling:
                del entry["replicas"]
                scaling = self.scaling[stage]
                entry["autoscaling"] = {"min_replicas": scaling["min_replicas"],
                                        "max_replicas": scaling["max_replicas"],
                                        "cap": self.caps[stage].reason}  # fmt: skip
            out[stage] = entry
        return out

    def describe(self, num_cpus: int) -> str:
        lines = [f"placement on {describe(self.shares, num_cpus)}"]
        for stage, scaling in self.scaling.items():
            cap = self.caps[stage]
            lines.append(
                f"{stage} autoscales {scaling['min_replicas']}-{scaling['max_replicas']} replicas "
                f"(at most {cap.max_replicas} here: {cap.reason})"
            )
        return "\n".join(lines)


def replica_bytes(checkpoint: Path, settings: dict[str, Any]) -> dict[str, int]:
    """What one encoder and one decoder replica hold on this machine (an estimate): the weights of
    their part of the checkpoint at the dtype they serve in, the decoder's KV cache, a process."""
    from services.common.config import load_config
    from services.decoder.engine.llm_engine import EngineConfig

    elements = _weight_elements(checkpoint)
    config = load_config(checkpoint)
    text = config.text_config
    out = {}
    for stage, part in (("encoder", "vision"), ("decoder", "text")):
        itemsize = _served_itemsize(settings.get(stage) or {})
        out[stage] = PROCESS_BYTES + elements[part] * itemsize
    engine = {**vars(EngineConfig()), **dict((settings.get("decoder") or {}).get("engine") or {})}
    per_token = text.num_hidden_layers * (text.kv_lora_rank + text.qk_rope_head_dim)
    # an `auto` cache fills what the replicas leave (their shares split by local serve): count the
    # least each must hold, one sequence of the longest length
    tokens = engine["kv_cache_tokens"]
    if tokens == "auto":
        tokens = min(engine["max_model_len"] or text.max_position_embeddings, text.max_position_embeddings)
    out["decoder"] += int(tokens) * per_token * _served_itemsize(settings.get("decoder") or {})
    return out


PROCESS_BYTES = 700 << 20  # a replica's interpreter with torch and a Ray worker, before weights
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _weight_elements(checkpoint: Path) -> dict[str, int]:
    """Elements of the vision part (tower and projector) and the text part, from the safetensors
    headers alone (no tensor is read)."""
    out = {"vision": 0, "text": 0}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            part = "text" if name.startswith("language_model") else "vision"
            out[part] += (end - start) // _ITEMSIZE.get(entry["dtype"], 2)
    return out


def _served_itemsize(section: dict[str, Any]) -> int:
    """Bytes per element of the dtype a stage serves in, resolved as the stage resolves it."""
    from services.common.devices import resolve_device, resolve_dtype

    device = resolve_device(str(section.get("device", "auto")))
    return int(resolve_dtype(str(section.get("dtype", "auto")), device).itemsize)
