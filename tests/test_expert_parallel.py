"""Expert parallelism on CPU with gloo: each rank a process holding E/N experts, checked against
the whole MoE layer in one process (EP = 1) on the same tiny checkpoint (8 experts, group-limited
noaux_tc routing)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.common.checkpoint import write_checkpoint
from services.common.weights import LoadStats
from services.decoder.expert_parallel.sharding import EPContext, ShardedExperts
from services.decoder.loading import load_text_model
from services.decoder.model.moe import MoE

pytestmark = pytest.mark.slow
HIDDEN = 64  # the tiny preset's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def tokens_for(rank: int, counts: list[int]) -> torch.Tensor:
    return torch.randn(counts[rank], HIDDEN, generator=torch.Generator().manual_seed(100 + rank))


def _rank_main(
    rank: int, size: int, port: int, root: str, out: str, counts: list[int], forced: bool, placements: dict
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        ctx = EPContext(rank, size, placements=placements)
        stats = LoadStats()
        model = load_text_model(root, torch.float32, ep=ctx, stats=stats)
        x = tokens_for(rank, counts)
        results = {"bytes": stats.bytes, "keys": stats.keys, "outputs": [], "moved": []}
        with torch.inference_mode():
            for layer in moe_layers(model):
                if forced:  # every token picks two of the next rank's experts; each expert gets rows
                    experts = layer.experts
                    ids, weights = forced_routing(rank, size, len(experts.owned), x.shape[0])
                    results["outputs"].append(experts(x, weights, ids))
                else:
                    results["outputs"].append(layer(x))
                results["moved"].append(layer.experts.last.rows_sent)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        # every rank done with its collectives before any tears gloo down: a rank that destroys
        # its group while a peer still uses it can abort the process (SIGABRT, seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def forced_routing(rank: int, size: int, per: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token i picks experts i and i + 1 (mod E/N) of the next rank, weighted 0.5 and 0.25."""
    base = (rank + 1) % size * per
    ids = torch.tensor([[base + i % per, base + (i + 1) % per] for i in range(tokens)], dtype=torch.int32)
    return ids, torch.tensor([[0.5, 0.25]]).expand(tokens, 2)


def run_group(
    root: Path, tmp: Path, size: int, counts: list[int], forced: bool = False, placements: dict | None = None
) -> list[dict]:
    args = (size, free_port(), str(root), str(tmp), counts, forced, placements or {})
    mp.start_processes(_rank_main, args=args, nprocs=size, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ep") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def whole(checkpoint):
    stats = LoadStats()
    return load_text_model(checkpoint, torch.float32, stats=stats), stats


@pytest.mark.parametrize(("size", "counts"), [(2, [7, 0]), (4, [5, 0, 13, 1])])
def test_sharded_moe_layers_equal_the_whole_layer(checkpoint, whole, tmp_path, size, counts):
    model, full = whole
    ranks = run_group(checkpoint, tmp_path, size, counts)
    with torch.inference_mode():
        for rank, got in enumerate(ranks):
            x = tokens_for(rank, counts)
            for layer, out in zip(moe_layers(model), got["outputs"], strict=True):
                torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    assert any(moved for got in ranks for moved in got["moved"]), "no row ever left its rank"
    # each rank read its experts and everything else; together, every expert exactly once
    expert_keys = [k for k in full.keys if ".mlp.experts." in k]
    for got in ranks:
        mine = [k for k in got["keys"] if ".mlp.experts." in k]
        assert len(mine) == len(expert_keys) // size
        assert sorted(set(got["keys"]) - set(mine)) == sorted(set(full.keys) - set(expert_keys))
    assert sorted(k for got in ranks for k in got["keys"] if ".mlp.experts." in k) == sorted(expert_keys)
    expert_bytes = full.bytes - ranks[0]["bytes"]
    assert expert_bytes > 0 and all(got["bytes"] == ranks[0]["bytes"] for got in ranks)


# Experts 0 and 1 (layer 1), 7, 6 and 0 (layer 2) are replicated: three slots per rank for 8 experts
REPLICATED = {
    1: ((0, 1, 2), (3, 4, 0), (5, 6, 1), (7, 0, 1)),
    2: ((0, 1, 7), (2, 3, 7), (4, 5, 6), (6, 7, 0)),
}


def test_replicated_experts_equal_the_whole_layer(checkpoint, whole, tmp_path):
    """A token uses its own rank's copy, or one of the other copies (rank 2's tokens pick among
    three for expert 0); the layer's output is the whole layer's either way."""
    model, _ = whole
    counts = [5, 0, 13, 4]
    ranks = run_group(checkpoint, tmp_path, 4, counts, placements=REPLICATED)
    with torch.inference_mode():
        for rank, got in enumerate(ranks):
            x = tokens_for(rank, counts)
            for layer, out in zip(moe_layers(model), got["outputs"], strict=True):
                torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    for rank, got in enumerate(ranks):  # each rank read its own copies, and only those
        held = {
            (int(m[1]), int(m[2]))
            for k in got["keys"]
            if (m := re.search(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", k))
        }
        assert held == {(layer, e) for layer, placement in REPLICATED.items() for e in placement[rank]}


def test_every_expert_fed_from_another_rank(checkpoint, whole, tmp_path):
    model, _ = whole
    counts = [8, 8]
    ranks = run_group(checkpoint, tmp_path, 2, counts, forced=True)
    with torch.inference_mode():
        for rank, got in enumerate(ranks):
            x = tokens_for(rank, counts)
            for layer, out in zip(moe_layers(model), got["outputs"], strict=True):
                ids, weights = forced_routing(rank, 2, layer.experts.num_experts // 2, 8)
                torch.testing.assert_close(out, layer.experts(x, weights, ids), rtol=1e-5, atol=1e-6)
            # every token crossed, once for its two experts on the other rank
            assert got["moved"] == [8] * len(got["moved"])


def test_context_checks():
    with pytest.raises(ValueError):
        EPContext(2, 2)
    with pytest.raises(Exception, match="divide"):
        EPContext(0, 3).experts(8)
    sharded = ShardedExperts(EPContext(1, 4), 8, HIDDEN, 32)
    assert list(sharded.owned) == [2, 3] and sharded.checkpoint_keys()[0] == "2.gate_proj.weight"
    assert "0.gate_proj.weight" in sharded.skipped_checkpoint_keys()
