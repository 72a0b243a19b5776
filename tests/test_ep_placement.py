"""Expert placement from recorded load: parsing the metrics, greedy balancing, the placement file
and the `kimi-vl ep-placement` command (pure; no Ray)."""

from __future__ import annotations

import json

import pytest

from services.cli import main
from services.common.errors import CheckpointError, InvalidInputError
from services.decoder.expert_parallel.placement import (
    balance,
    contiguous,
    imbalance,
    load_from_metrics,
    plan,
    read_placements,
)
from services.decoder.expert_parallel.sharding import EPContext

HOT = [100.0, 90.0, 80.0, 70.0, 1.0, 1.0, 1.0, 1.0]  # the first four experts take nearly every token

PAGE = "\n".join(
    ["# HELP ray_kimi_vl_expert_tokens_total Token rows.", "# TYPE ray_kimi_vl_expert_tokens_total counter"]
    + [
        f'ray_kimi_vl_expert_tokens_total{{expert="{e}",layer="{layer}",WorkerId="w{w}"}} {v / 2}'
        for layer in (1, 2)
        for w in (0, 1)  # two replicas' series of the same expert are summed
        for e, v in enumerate(HOT if layer == 1 else list(reversed(HOT)))
    ]
)


def test_balancing_evens_out_a_skewed_load():
    placement = balance(HOT, 2)
    assert sorted(e for experts in placement for e in experts) == list(range(8))
    assert all(len(experts) == 4 for experts in placement)
    assert imbalance(HOT, contiguous(8, 2)) > 1.9
    assert imbalance(HOT, placement) < 1.05
    with pytest.raises(InvalidInputError):
        balance(HOT, 3)


def test_metrics_page_to_placement_file_and_back(tmp_path):
    load = load_from_metrics(PAGE)
    assert load == {1: HOT, 2: list(reversed(HOT))}
    out = tmp_path / "placement.json"
    out.write_text(json.dumps(plan(load, 4)))
    placements = read_placements(out, 4)
    assert set(placements) == {1, 2}
    ctx = EPContext(1, 4, placements=placements)
    assert ctx.experts(8, layer=1) == placements[1][1] and ctx.experts(8, layer=5) == (2, 3)
    with pytest.raises(InvalidInputError, match="not 2"):
        read_placements(out, 2)
    with pytest.raises(CheckpointError):
        EPContext(0, 2, placements={1: ((0, 1), (1, 2, 3, 4, 5, 6, 7))}).experts(8, layer=1)


def test_the_command(tmp_path, capsys):
    page, out = tmp_path / "metrics.txt", tmp_path / "placement.json"
    page.write_text(PAGE)
    assert main(["ep-placement", "--metrics", str(page), "--ranks", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["imbalance"]["1"]["after"] < summary["imbalance"]["1"]["before"]
    assert read_placements(out, 2)[2] == balance(list(reversed(HOT)), 2)
    args = ["ep-placement", "--metrics", str(page), "--ranks", "2", "--out", str(out)]
    assert main([*args, "--redundant-per-rank", "1"]) == 0
    capsys.readouterr()
    assert read_placements(out, 2)[1] == balance(HOT, 2, redundant=1)
    assert all(len(experts) == 5 for experts in read_placements(out, 2)[1])


def test_rank_bundles_carry_resources_and_the_label_selector():
    from services.decoder.expert_parallel.group import EPSettings, rank_bundles

    settings = EPSettings(size=4, cpus_per_rank=2, label_selector={"kimi-vl/stage": "decoder"})
    bundles, selectors = rank_bundles(settings, "cuda")
    assert bundles == [{"CPU": 2, "GPU": 1.0}] * 4
    assert selectors == [{"kimi-vl/stage": "decoder"}] * 4
    assert rank_bundles(EPSettings(size=2), "cpu") == ([{"CPU": 1.0}] * 2, None)
    with pytest.raises(InvalidInputError, match="label_selector"):
        EPSettings(size=2, label_selector={"kimi-vl/stage": 1})


def test_redundant_slots_copy_an_expert_too_hot_for_one_rank():
    load = [1000.0] + [1.0] * 7  # one expert has nearly every token: no partition can balance it
    alone = balance(load, 2)
    assert imbalance(load, alone) > 1.9
    copied = balance(load, 2, redundant=1)
    assert all(0 in experts and len(experts) == 5 for experts in copied)  # a copy on each rank
    assert sorted({e for experts in copied for e in experts}) == list(range(8))
    assert imbalance(load, copied) < 1.01
    with pytest.raises(InvalidInputError, match="redundant"):
        balance(load, 2, redundant=5)  # more copies than ranks to hold them


def test_random_loads_give_valid_placements():
    import random

    from services.decoder.expert_parallel.sharding import check_placement

    rng = random.Random(0)
    for _ in range(300):
        ranks = rng.choice([2, 4, 8])
        n = ranks * rng.choice([1, 2, 4])
        redundant = rng.randint(0, n * (ranks - 1) // ranks)
        placement = balance([rng.paretovariate(1.2) for _ in range(n)], ranks, redundant)
        check_placement(placement, n, ranks)
        assert {len(experts) for experts in placement} == {n // ranks + redundant}


def test_making_room_moves_an_expert_the_spare_rank_lacks():
    from services.decoder.expert_parallel.placement import _make_room

    owned = [[0, 1], [2, 3], [0]]  # placing another copy of 0: only rank 2 has room, and holds 0
    totals = [2.0, 2.0, 1.0]
    rank = _make_room(owned, 2, 0, [1.0] * 4, [3, 1, 1, 1], totals)
    assert rank == 1 and owned == [[0, 1], [3], [0, 2]] and totals == [2.0, 1.0, 2.0]


def test_a_replicated_placement_file_is_read_and_checked(tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"ranks": 2, "layers": {"1": [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]}}))
    assert read_placements(path, 2) == {1: ((0, 1, 2, 3, 4), (4, 5, 6, 7, 0))}
    for bad in ([[0, 0, 1, 2], [3, 4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7, 0]]):
        path.write_text(json.dumps({"ranks": 2, "layers": {"1": bad}}))
        with pytest.raises(CheckpointError):
            read_placements(path, 2)
