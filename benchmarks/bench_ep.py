"""Expert parallelism: decode-step MoE layers at EP = 1, 2, 4 on CPU (gloo), with the dispatch,
compute and combine times broken out and the bytes moved per step; then a projection of EP = 8 on
8 GPUs for the released model.

    python benchmarks/bench_ep.py --sizes 1 2 4 --batch 16 --json /tmp/bench_ep.json

Each rank is a process with 1 torch thread, holding the `--preset`'s MoE layer (the release's widths
for `mid`: hidden 2048, 64 experts of 1408, top-6, 2 shared) with random weights, so routing is
about uniform (real traffic is skewed; see the expert-load metrics). Every rank decodes `--batch`
tokens of its own per step (data-parallel attention adds requests with ranks), so the group's
throughput is N × batch / step time, for one MoE layer. EP = 1 is the same layer unsharded
(`FusedExperts`, no collectives) in one process: the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.common.checkpoint import build_config
from services.common.config import TextConfig, parse_config
from services.decoder.expert_parallel.sharding import EPContext, shard_moe
from services.decoder.model.moe import MoE

SPECIALS = {"[BOS]": 1, "<|im_end|>": 2, "[PAD]": 0, "<|media_pad|>": 3}


def text_config(preset: str) -> TextConfig:
    return parse_config(build_config(preset, 1024, SPECIALS)).text_config


def build_layer(cfg: TextConfig, ep: EPContext | None) -> MoE:
    torch.manual_seed(0)  # every rank builds the same router
    with torch.device("meta"):
        layer = MoE(cfg)
    if ep is not None:  # this rank's experts only
        shard_moe(layer, ep)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    return layer.eval()


def _rank_main(rank: int, size: int, port: int, preset: str, batch: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        layer = build_layer(text_config(preset), EPContext(rank, size))
        layer.experts.profile = True
        x = torch.randn(batch, layer.cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
        rows = []
        with torch.inference_mode():
            for step in range(steps + 3):
                dist.barrier()
                start = time.perf_counter()
                layer(x)
                total = time.perf_counter() - start
                s = layer.experts.last
                if step >= 3:  # warm-up steps are not counted
                    rows.append((total, s.dispatch_s, s.compute_s, s.combine_s, s.bytes_moved, s.rows_sent))
        torch.save(rows, Path(out) / f"rank{rank}.pt")
        # every rank done with its collectives before any tears gloo down: a rank that destroys
        # its group while a peer still uses it can abort the process (SIGABRT, seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ep(size: int, preset: str, batch: int, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(size, port, preset, batch, steps, tmp), nprocs=size,
                           start_method="spawn")  # fmt: skip
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(size)]
    # a step ends when its slowest rank ends
    step_s = [max(r[i][0] for r in ranks) for i in range(steps)]
    column = lambda j: statistics.median(statistics.mean(r[i][j] for r in ranks) for i in range(steps))  # noqa: E731
    step = statistics.median(step_s)
    return {
        "ep": size,
        "batch_per_rank": batch,
        "step_ms": step * 1e3,
        "tokens_per_s": size * batch / step,
        "dispatch_ms": column(1) * 1e3,
        "compute_ms": column(2) * 1e3,
        "combine_ms": column(3) * 1e3,
        "bytes_moved_per_step": sum(statistics.median(r[i][4] for i in range(steps)) for r in ranks),
        "rows_sent_per_step": sum(statistics.median(r[i][5] for i in range(steps)) for r in ranks),
    }


def run_single(preset: str, batch: int, steps: int) -> dict:
    torch.set_num_threads(1)
    layer = build_layer(text_config(preset), None)
    x = torch.randn(batch, layer.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for step in range(steps + 3):
            start = time.perf_counter()
            layer(x)
            if step >= 3:
                times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"ep": 1, "batch_per_rank": batch, "step_ms": step * 1e3, "tokens_per_s": batch / step}


# --- the EP = 8 projection ---------------------------------------------------------------------

# Stated, not measured here (no GPU was lent): H100 SXM figures.
GPU_HBM_BYTES_PER_S = 3.35e12
GPU_BF16_FLOPS = 989e12 * 0.6  # dense peak x a utilisation typical of grouped GEMMs at these sizes
NVLINK_BYTES_PER_S = 450e9 * 0.7  # per GPU per direction, x all_to_all efficiency
COLLECTIVE_LATENCY_S = 15e-6  # per all_to_all_single call on 8 GPUs


def project_ep8(batch: int = 256, ranks: int = 8) -> dict:
    """One decode step of the released model (26 MoE layers, bf16) on 8 GPUs, per rank.

    Dispatch sends one row per (token, other rank owning any of its experts), plus its slots
    (2 · top_k fp32) in the same call; combine returns one partial row each. With uniform routing,
    an other rank owns one of a token's K experts with probability 1 - C(E - E/N, K) / C(E, K).
    For comparison, "per_slot" is the earlier design: one row per (token, slot) on another rank,
    and the ids in a call of their own.
    """
    hidden, experts, inter, top_k, layers = 2048, 64, 1408, 6, 26
    local = experts // ranks
    weight_bytes = local * 3 * hidden * inter * 2  # this rank's experts, read once per layer
    rows = batch * top_k  # (row, slot) pairs each rank computes (uniform routing)
    flops = rows * 3 * hidden * inter * 2
    compute_s = max(weight_bytes / GPU_HBM_BYTES_PER_S, flops / GPU_BF16_FLOPS)
    hit = 1 - math.comb(experts - local, top_k) / math.comb(experts, top_k)
    remote_rows = batch * (ranks - 1) * hit
    wire_bytes = remote_rows * (hidden * 2 + 2 * top_k * 4)  # each way (the slots go out only)
    comm_s = 2 * wire_bytes / NVLINK_BYTES_PER_S + 3 * COLLECTIVE_LATENCY_S  # counts, rows, back
    slot_rows = batch * top_k * (ranks - 1) / ranks
    slot_bytes = slot_rows * hidden * 2
    slot_comm_s = 2 * slot_bytes / NVLINK_BYTES_PER_S + 4 * COLLECTIVE_LATENCY_S  # counts, rows, ids, back
    return {
        "batch_per_rank": batch,
        "remote_rows_per_token": {"per_rank": remote_rows / batch, "per_slot": slot_rows / batch},
        "per_layer_us": {"experts": compute_s * 1e6, "dispatch_plus_combine": comm_s * 1e6,
                         "dispatch_plus_combine_per_slot": slot_comm_s * 1e6},
        "per_step_ms": {"experts": layers * compute_s * 1e3, "dispatch_plus_combine": layers * comm_s * 1e3,
                        "dispatch_plus_combine_per_slot": layers * slot_comm_s * 1e3},
        "bytes_each_way_per_layer": {"per_rank": wire_bytes, "per_slot": slot_bytes},
        "assumed": {"hbm_bytes_per_s": GPU_HBM_BYTES_PER_S, "bf16_flops": GPU_BF16_FLOPS,
                    "nvlink_bytes_per_s": NVLINK_BYTES_PER_S, "collective_latency_s": COLLECTIVE_LATENCY_S},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=16, help="decode tokens per rank per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    baseline = run_single(args.preset, args.batch, args.steps)
    results = [baseline] + [run_ep(n, args.preset, args.batch, args.steps) for n in args.sizes if n > 1]
    if 1 in args.sizes:  # the EP path itself at one rank: the cost of the machinery without peers
        results.insert(1, {**run_ep(1, args.preset, args.batch, args.steps), "ep": "1 (sharded path)"})
    print("| EP | tokens/s (one MoE layer) | vs EP=1 | step ms | dispatch ms | compute ms | combine ms | "
          "bytes moved / step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["tokens_per_s"] / baseline["tokens_per_s"]
        print(f"| {r['ep']} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | "
              f"{r['step_ms']:.1f} | {r.get('dispatch_ms', 0):.2f} | {r.get('compute_ms', 0):.1f} | "
              f"{r.get('combine_ms', 0):.2f} | {r.get('bytes_moved_per_step', 0):,.0f} |")  # fmt: skip
    projection = project_ep8()
    print(json.dumps({"projection_ep8": projection}, indent=2), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "projection_ep8": projection}, indent=2))


if __name__ == "__main__":
    main()
