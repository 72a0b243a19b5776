"""A static expert-to-rank placement from recorded expert load (`kimi-vl ep-placement`).

Input: tokens per (MoE layer, expert), as the decoder exports them in
`kimi_vl_expert_tokens_total{layer, expert}` (Prometheus text, from `GET /metrics`). Output: per
layer, which experts each of N ranks owns, so each rank's share of the tokens is as even as
greedy balancing makes it (the heaviest expert first, to the lightest rank with room; every rank
keeps E/N experts, so weights stay even too). A decoder starts from it with
`ep.placement_file`. Replicating the hottest experts (DeepSeek's EPLB) is not done here.

Pure: no I/O beyond the JSON helpers; knows nothing about Ray or the model.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.common.errors import InvalidInputError
from services.decoder.expert_parallel import Placement, check_placement

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


def balance(load: Sequence[float], ranks: int) -> Placement:
    """Experts to ranks, E/N each, the rank loads as even as greedy (largest first) makes them."""
    n = len(load)
    if ranks < 1 or n % ranks:
        raise InvalidInputError(f"{n} experts do not divide over {ranks} ranks")
    per = n // ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    totals = [0.0] * ranks
    for expert in sorted(range(n), key=lambda e: (-load[e], e)):
        rank = min((r for r in range(ranks) if len(owned[r]) < per), key=lambda r: (totals[r], r))
        owned[rank].append(expert)
        totals[rank] += load[expert]
    return tuple(tuple(sorted(experts)) for experts in owned)


def imbalance(load: Sequence[float], placement: Placement) -> float:
    """Max over mean of the ranks' token loads (1.0 = even)."""
    totals = [sum(load[e] for e in experts) for experts in placement]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0


def contiguous(num_experts: int, ranks: int) -> Placement:
    per = num_experts // ranks
    return tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ranks))


def plan(load_by_layer: Mapping[int, Sequence[float]], ranks: int) -> dict[str, object]:
    """The placement file's content, with each layer's imbalance before (contiguous) and after."""
    layers, report = {}, {}
    for layer, load in sorted(load_by_layer.items()):
        placement = balance(load, ranks)
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
        check_placement(placement, sum(len(x) for x in placement), ranks)
    return out
