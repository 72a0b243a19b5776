"""A static expert-to-rank placement from recorded expert load (`kimi-vl ep-placement`).

Input: tokens per (MoE layer, expert), as the decoder exports them in
`kimi_vl_expert_tokens_total{layer, expert}` (Prometheus text, from `GET /metrics`). Output: per
layer, which experts each of N ranks owns, so each rank's share of the tokens is as even as
greedy balancing makes it (the heaviest expert first, to the lightest rank with room; every rank
keeps E/N experts, so weights stay even too), optionally with extra slots per rank that hold
copies of the hottest experts (DeepSeek's EPLB). A decoder starts from it with `ep.placement_file`.

Pure: no I/O beyond the JSON helpers; knows nothing about Ray or the model.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.common.errors import InvalidInputError
from services.decoder.expert_parallel.sharding import Placement, check_placement, contiguous

_SAMPLE = re.compile(r"^(?:ray_)?kimi_vl_expert_tokens_total\{([^}]*)\}\s+([0-9.eE+-]+)\s*$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def load_from_metrics(text: str) -> dict[int, list[float]]:
    """Tokens per expert per layer from exposition text (series of every replica summed)."""
    found: dict[int, dict[int, float]] = defaultdict(dict)
    for labels, value in _SAMPLE.findall(text):
        tags = dict(_LABEL.findall(labels))
        if "layer" in tags and "expert" in tags:
            layer, expert = int(tags["layer"]), int(tags["expert"])
            found[layer][expert] = found[layer].get(expert, 0.0) + float(value)
    if not found:
        raise InvalidInputError("no kimi_vl_expert_tokens_total series with layer and expert labels")
    out = {}
    for layer, experts in found.items():
        width = max(experts) + 1
        out[layer] = [experts.get(e, 0.0) for e in range(width)]
    return out


def balance(load: Sequence[float], ranks: int, redundant: int = 0) -> Placement:
    """Experts to ranks, E/N + `redundant` each, the rank loads as even as greedy makes them.

    With `redundant` > 0, the extra slots hold copies of the hottest experts, as DeepSeek's EPLB
    does: each slot goes in turn to the expert with the most tokens per copy, and a token uses one
    copy, so the copies share an expert's load evenly (the decoder's dispatch does so). Then every
    copy, heaviest share first, goes to the lightest rank with room that lacks that expert.
    """
    n = len(load)
    if ranks < 1 or n % ranks:
        raise InvalidInputError(f"{n} experts do not divide over {ranks} ranks")
    if not 0 <= redundant * ranks <= n * (ranks - 1):
        raise InvalidInputError(f"{redundant} redundant experts per rank: at most {n * (ranks - 1) // ranks}")
    copies = [1] * n
    for _ in range(redundant * ranks):
        hot = max((e for e in range(n) if copies[e] < ranks), key=lambda e: (load[e] / copies[e], -e))
        copies[hot] += 1
    slots = n // ranks + redundant
    owned: list[list[int]] = [[] for _ in range(ranks)]
    totals = [0.0] * ranks
    for e in sorted((e for e in range(n) for _ in range(copies[e])), key=lambda e: (-load[e] / copies[e], e)):
        room = [r for r in range(ranks) if len(owned[r]) < slots]
        options = [r for r in room if e not in owned[r]]
        if not options:  # every rank with room holds e: make room on a full rank that lacks it
            options = [_make_room(owned, room[0], e, load, copies, totals)]
        rank = min(options, key=lambda r: (totals[r], r))
        owned[rank].append(e)
        totals[rank] += load[e] / copies[e]
    return tuple(tuple(sorted(experts)) for experts in owned)


def _make_room(
    owned: list[list[int]], spare: int, e: int, load: Sequence[float], copies: list[int], totals: list[float]
) -> int:
    """Move an expert from a full rank lacking `e` to `spare` (which has room but holds `e`); that
    rank is returned. One exists: `e` is not yet on every rank, and a full rank holds some expert
    that `spare` lacks."""
    for q, experts in enumerate(owned):
        if q != spare and e not in experts:
            f = next(f for f in experts if f not in owned[spare])
            experts.remove(f)
            owned[spare].append(f)
            share = load[f] / copies[f]
            totals[q] -= share
            totals[spare] += share
            return q
    raise InvalidInputError(f"no rank can take another copy of expert {e}")


def imbalance(load: Sequence[float], placement: Placement) -> float:
    """Max over mean of the ranks' token loads (1.0 = even); copies share their expert's load."""
    copies = Counter(e for experts in placement for e in experts)
    totals = [sum(load[e] / copies[e] for e in experts) for experts in placement]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0


def plan(load_by_layer: Mapping[int, Sequence[float]], ranks: int, redundant: int = 0) -> dict[str, object]:
    """The placement file's content, with each layer's imbalance before (contiguous) and after."""
    layers, report = {}, {}
    for layer, load in sorted(load_by_layer.items()):
        placement = balance(load, ranks, redundant)
        layers[str(layer)] = [list(experts) for experts in placement]
        before = imbalance(load, contiguous(len(load), ranks))
        report[str(layer)] = {"before": round(before, 4), "after": round(imbalance(load, placement), 4)}
    return {"ranks": ranks, "layers": layers, "imbalance": report}


def read_placements(path: str | Path, ranks: int) -> dict[int, Placement]:
    """The per-layer placements of a file `plan` wrote, checked against the group size."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data["ranks"] != ranks:
            raise InvalidInputError(f"{path} places experts on {data['ranks']} ranks, not {ranks}")
        out = {int(layer): tuple(tuple(int(e) for e in experts) for experts in placement)
               for layer, placement in data["layers"].items()}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot read the placement file {path}: {e}") from e
    for placement in out.values():
        check_placement(placement, len({e for experts in placement for e in experts}), ranks)
    return out
