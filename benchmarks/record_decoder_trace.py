"""Record the figures a decoder replica reports for autoscaling (sequences running, requests
waiting, KV-cache share) from the real engine, step by step, under a load step of closed-loop
clients: 2, then 32, then 2. The trace is what `tests/test_scaling_policies.py` replays through the
decoder policy (`tests/data/decoder_load_step.json`).

    python benchmarks/record_decoder_trace.py --out tests/data/decoder_load_step.json

The tiny checkpoint, on the CPU, with a small engine (16 sequences, 2,048 KV tokens) so that the
step saturates it: the trace's shape, not its timing, is the point.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.checkpoint import write_checkpoint  # noqa: E402
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from services.decoder.engine.params import SamplingParams  # noqa: E402
from services.decoder.loading import load_text_model  # noqa: E402

PHASES = ((2, 40), (32, 160), (2, 200))  # (clients, engine steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rng = random.Random(19)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "tiny", dtype=torch.float32)
        model = load_text_model(checkpoint, dtype=torch.float32)
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_tokens=2048, max_num_seqs=16))
    owner: dict[int, int] = {}  # sequence -> client
    records = []

    def submit(client: int) -> None:
        prompt = [rng.randrange(10, 900) for _ in range(rng.randrange(60, 240))]
        params = SamplingParams(max_new_tokens=rng.randrange(24, 64), ignore_eos=True)
        (seq,) = engine.add_group(prompt, params)
        owner[seq] = client

    clients = 0
    for target, steps in PHASES:
        for client in range(clients, target):
            submit(client)
        clients = target
        for _ in range(steps):
            for out in engine.step():
                if out.finished:
                    client = owner.pop(out.seq_id)
                    if client < clients:  # a client of a past phase stops with its last request
                        submit(client)
            stats = engine.stats()
            records.append({"clients": clients, "running": stats.num_running, "waiting": stats.num_waiting,
                            "kv_cache_usage": round(stats.kv_cache_usage, 4)})  # fmt: skip
    Path(args.out).write_text(json.dumps({"phases": PHASES, "records": records}, indent=0) + "\n")
    print(f"{len(records)} steps written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
