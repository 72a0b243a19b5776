"""Serving throughput: the engine under N concurrent requests vs transformers one request at a time.

For each checkpoint preset, one process writes the checkpoint, loads it with our loader and as a
transformers `DeepseekV3ForCausalLM` (the same tensors, the same dtype), and measures:
- ours: N requests submitted at once to `AsyncEngine` (the serving path: one step thread,
  continuous batching over the paged cache), each a different random prompt so nothing is served
  from the prefix cache (checked). A fresh engine per N. Per request: TTFT = submit -> first
  token, TPOT = (last - first) / (tokens - 1); output tok/s = all tokens / wall time.
- the baseline: `generate` (greedy, min = max new tokens) for a few of the same requests, one at
  a time, timed by a streamer. Serving one at a time costs the same per request at any N, so its
  one-stream tok/s is the baseline rate for every N (half the requests run before our points,
  half after, so drift hits both).
- the limit of each point: bytes a decode step of N sequences must read (dense weights, the
  routed experts N tokens touch, the KV latents) over this machine's plain-read bandwidth
  (measured here by `gemv_roofline.py`), and its FLOPs over a GEMM rate measured here; the
  larger is the floor, compared with the measured decode-step time. Usage:

    python benchmarks/bench_engine.py --presets tiny mid --concurrency 1 4 16 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import gemv_roofline  # benchmarks/ is on sys.path when this file runs as a script
import torch
import torch.nn.functional as F

from services.common.checkpoint import write_checkpoint
from services.common.config import TextConfig
from services.decoder.engine.async_engine import AsyncEngine, GenerationRequest
from services.decoder.engine.llm_engine import EngineConfig, LLMEngine
from services.decoder.engine.params import SamplingParams
from services.decoder.loading import load_text_model
from services.decoder.model.hf_reference import export_hf_decoder, load_hf_decoder

DEFAULT_DTYPES = {"tiny": "float32", "mid": "bfloat16"}
BLOCK_SIZE = 16
MAX_NUM_BATCHED_TOKENS = 2048  # 4 prompts of 512 per step: TTFT grows by one chunk-step per 4
ROOFLINE_SHAPES = [(2816, 2048), (11264, 2048)]  # [out, in]: an expert's w13, a dense gate/up
GEMM_SHAPE = (256, 2048, 2816)  # [T, in, out]: a large-batch expert matmul


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation; the value itself for one sample."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --- this machine's rates --------------------------------------------------------------------


@dataclass(frozen=True)
class MachineRates:
    read_gbps: float  # plain read (sum) of weights larger than any cache
    gemv_gbps: float  # batch-1 GEMV over the same weights
    gemm_gflops: float  # F.linear at GEMM_SHAPE


def measure_machine(dtype: torch.dtype) -> MachineRates:
    """Bandwidth by `gemv_roofline.main` (two of its shapes, 512 MiB each), a GEMM rate here."""
    out = io.StringIO()
    argv = ["gemv_roofline.py", "--dtype", str(dtype).removeprefix("torch."), "--rounds", "3"]
    with (
        mock.patch.object(gemv_roofline, "SHAPES", ROOFLINE_SHAPES),
        mock.patch.object(gemv_roofline, "WORKING_SET_BYTES", 1 << 29),
        mock.patch.object(sys, "argv", argv),
        contextlib.redirect_stdout(out),
    ):
        gemv_roofline.main()
    found = re.findall(r"GEMV ([\d.]+) GB/s, plain read \(sum\) ([\d.]+) GB/s", out.getvalue())
    t, k, n = GEMM_SHAPE
    x, w = torch.randn(t, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(3):
        F.linear(x, w)
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        F.linear(x, w)
    gflops = 2 * t * k * n * rounds / (time.perf_counter() - start) / 1e9
    return MachineRates(
        read_gbps=statistics.median(float(r) for _, r in found),
        gemv_gbps=statistics.median(float(g) for g, _ in found),
        gemm_gflops=gflops,
    )


# --- what a decode step must read and compute ------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """Bytes and FLOPs of one decode step of B sequences, from the model's own parameters."""

    cfg: TextConfig
    dense_bytes: int  # read whole every step: attention, dense MLPs, shared experts, router, head
    dense_params: int  # matmul weights every token multiplies by (2-D, embedding excluded)
    expert_params: int  # one routed expert of one layer (w13 + w2)
    elem: int  # bytes per value of the weights and the cache

    @classmethod
    def of(cls, model: torch.nn.Module) -> StepCost:
        cfg: TextConfig = model.cfg
        dense = dense_params = expert = 0
        for name, p in model.named_parameters():
            if ".experts.w" in name:
                expert += p.numel() // cfg.n_routed_experts
            elif not name.endswith("embed_tokens.weight"):  # the embedding: b rows, see weight_bytes
                dense += p.numel() * p.element_size()
                dense_params += p.numel() if p.dim() == 2 else 0
        elem = next(model.parameters()).element_size()
        return cls(cfg, dense, dense_params, expert // cls._moe_layers(cfg), elem)

    @staticmethod
    def _moe_layers(cfg: TextConfig) -> int:
        return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))

    def distinct_experts(self, b: int) -> float:
        """Expected experts a layer touches for b tokens × top-k, routing uniform: E·(1-(1-k/E)^b)."""
        e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        return e * (1 - (1 - k / e) ** b)

    def weight_bytes(self, b: int) -> float:
        routed = self._moe_layers(self.cfg) * self.distinct_experts(b) * self.expert_params * self.elem
        return self.dense_bytes + routed + b * self.cfg.hidden_size * self.elem

    def kv_bytes(self, b: int, context: int) -> float:
        return b * context * self.cfg.latent_dim * self.elem * self.cfg.num_hidden_layers

    def flops(self, b: int, context: int) -> float:
        c = self.cfg
        matmul = self.dense_params + self._moe_layers(c) * c.num_experts_per_tok * self.expert_params
        # absorbed MLA: scores against [c_kv | k_pe], then probabilities × c_kv, per head
        attention = c.num_hidden_layers * c.num_attention_heads * context * (c.latent_dim + c.kv_lora_rank)
        return 2 * b * (matmul + attention)

    def prefill_flops(self, prompt_len: int) -> float:
        """One prompt, expanded causal attention: each query sees (on average) half the prompt."""
        c = self.cfg
        matmul = self.dense_params + self._moe_layers(c) * c.num_experts_per_tok * self.expert_params
        per_query = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
        return 2 * prompt_len * (matmul + per_query * prompt_len / 2)


# --- our engine through the async front --------------------------------------------------------


class _StepProbe:
    """Times each engine step from inside the step thread: pure decode steps by batch size, and
    the total of steps that carry prefill chunks. Wraps the instance's `step` and its scheduler's
    `schedule`; the engine code is unchanged."""

    def __init__(self, engine: LLMEngine) -> None:
        self.decode_steps: dict[int, list[float]] = {}  # batch size -> seconds of pure decode steps
        self.prefill_s = 0.0  # steps with any prefill chunk (decodes riding along included)
        self._decodes: int | None = None
        schedule, step = engine.scheduler.schedule, engine.step

        def probed_schedule():
            batch = schedule()
            decoding = batch is not None and all(
                n == 1 and s.output_ids for s, n in zip(batch.seqs, batch.query_lens, strict=True)
            )
            self._decodes = len(batch.seqs) if decoding else None
            return batch

        def probed_step():
            self._decodes = None
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            if self._decodes is None:
                self.prefill_s += seconds
            else:
                self.decode_steps.setdefault(self._decodes, []).append(seconds)
            return outputs

        engine.scheduler.schedule, engine.step = probed_schedule, probed_step


@dataclass(frozen=True)
class Timing:
    """One request as its client saw it."""

    ttft: float
    tpot: float
    tokens: int
    seconds: float  # submit -> last token


def _timing(start: float, token_times: list[float]) -> Timing:
    first, last = token_times[0], token_times[-1]
    tpot = (last - first) / (len(token_times) - 1) if len(token_times) > 1 else 0.0
    return Timing(first - start, tpot, len(token_times), last - start)


async def _client(front: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams) -> Timing:
    start = time.perf_counter()
    times: list[float] = []
    async for out in front.generate(GenerationRequest(request_id, prompt, params)):
        now = time.perf_counter()
        times.extend([now] * sum(len(d.token_ids) for d in out.outputs))
    return _timing(start, times)


def serve(model, prompts: list[list[int]], new_tokens: int, config: EngineConfig) -> dict:
    """All prompts submitted at once to a fresh engine's async front; per-request timings."""
    engine = LLMEngine(model, config)
    probe = _StepProbe(engine)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def run() -> tuple[list[Timing], float]:
        front = AsyncEngine(engine)
        try:
            start = time.perf_counter()
            clients = (_client(front, f"r{i}", p, params) for i, p in enumerate(prompts))
            timings = await asyncio.gather(*clients)
            return list(timings), time.perf_counter() - start
        finally:
            await front.shutdown(5.0)

    timings, wall = asyncio.run(run())
    stats = engine.stats()
    full = probe.decode_steps.get(len(prompts), [])
    return {
        "timings": timings,
        "wall_s": wall,
        "prefill_steps_s": probe.prefill_s,
        "decode_steps_s": sum(sum(v) for v in probe.decode_steps.values()),
        "decode_step_s": statistics.median(full) if full else float("nan"),  # at batch N
        "prefix_cache_hits": stats.prefix_cache_hits,
    }


# --- the transformers baseline ------------------------------------------------------------------


class _TimeStreamer:
    """Notes when `generate` pushes tokens: the prompt first, then one call per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_request(model, prompt: list[int], new_tokens: int) -> Timing:
    ids = torch.tensor([prompt])
    streamer = _TimeStreamer()
    start = time.perf_counter()
    model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        streamer=streamer,
    )  # fmt: skip
    return _timing(start, streamer.times[1:])


# --- one preset ---------------------------------------------------------------------------------


def _summary(timings: list[Timing], wall: float) -> dict:
    ttft, tpot = [t.ttft for t in timings], [t.tpot for t in timings]
    return {
        "tok_s": sum(t.tokens for t in timings) / wall,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "tpot_p50_s": _pct(tpot, 0.5),
        "tpot_p99_s": _pct(tpot, 0.99),
    }


def _floors(cost: StepCost, rates: MachineRates, b: int, prompt_len: int, new: int) -> dict:
    """The floors of a decode step of b sequences, and the tok/s ceiling of the whole workload."""
    context = prompt_len + new // 2  # the average context of the decode phase
    weights, kv = cost.weight_bytes(b), cost.kv_bytes(b, context)
    bw_s = (weights + kv) / (rates.read_gbps * 1e9)
    flop_s = cost.flops(b, context) / (rates.gemm_gflops * 1e9)
    prefill_s = cost.prefill_flops(prompt_len) / (rates.gemm_gflops * 1e9)
    return {
        "distinct_experts": cost.distinct_experts(b),
        "weight_mb": weights / 1e6,
        "kv_mb": kv / 1e6,
        "bw_floor_ms": bw_s * 1e3,
        "compute_floor_ms": flop_s * 1e3,
        "floor": "bandwidth" if bw_s >= flop_s else "compute",
        "floor_s": max(bw_s, flop_s),
        # b prompts' prefill at the GEMM rate, then `new` decode steps at their floor
        "ceiling_tok_s": b * new / (b * prefill_s + new * max(bw_s, flop_s)),
    }


def _bound(point: dict, floors: dict, one: dict, baseline_tok_s: float) -> dict:
    """How far a point is from its floors; `one` holds the floors of one request at a time."""
    return {
        **floors,
        "of_limit": floors["floor_s"] / point["decode_step_s"],  # 1.0 = the decode step at its floor
        "achieved_gbps": (floors["weight_mb"] + floors["kv_mb"]) / 1e3 / point["decode_step_s"],
        "ceiling_vs_baseline": floors["ceiling_tok_s"] / baseline_tok_s,  # the most any engine gets
        "batching_gain_at_floor": floors["ceiling_tok_s"] / one["ceiling_tok_s"],
    }


def bench_preset(preset: str, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    rates = measure_machine(dtype)
    max_n, p_len, new = max(args.concurrency), args.prompt_len, args.new_tokens
    per_seq = -(-(p_len + new) // BLOCK_SIZE) * BLOCK_SIZE
    config = EngineConfig(
        block_size=BLOCK_SIZE,
        kv_cache_tokens=max_n * per_seq,
        max_num_seqs=max_n,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / preset, preset=preset, dtype=dtype, shard_bytes=512 * 2**20)
        ours = load_text_model(ckpt, dtype)
        hf = load_hf_decoder(export_hf_decoder(ckpt, Path(tmp) / "hf", eos=False), dtype)
    gen = torch.Generator().manual_seed(0)
    vocab = ours.cfg.vocab_size
    prompts = torch.randint(0, vocab, (max(max_n, args.baseline_requests), p_len), generator=gen).tolist()
    warm = torch.randint(0, vocab, (2, 32), generator=gen).tolist()  # threads, allocator, kernels
    hf_request(hf, warm[0], 2)
    serve(ours, warm, 4, config)

    k = args.baseline_requests
    base = [hf_request(hf, p, new) for p in prompts[: k // 2]]
    points = []
    for n in args.concurrency:
        r = serve(ours, prompts[:n], new, config)
        points.append({"concurrency": n, **{key: v for key, v in r.items() if key != "timings"}})
        points[-1].update(_summary(r["timings"], r["wall_s"]))
        print(f"  {preset} N={n}: {points[-1]['tok_s']:.1f} tok/s, {r['wall_s']:.1f} s", flush=True)
    base += [hf_request(hf, p, new) for p in prompts[k // 2 : k]]

    baseline = _summary(base, sum(t.seconds for t in base))
    cost = StepCost.of(ours)
    one = _floors(cost, rates, 1, p_len, new)  # the baseline's workload: one request at a time
    for point in points:
        point["ratio"] = point["tok_s"] / baseline["tok_s"]
        floors = _floors(cost, rates, point["concurrency"], p_len, new)
        point.update(_bound(point, floors, one, baseline["tok_s"]))
    return {
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompt_len": p_len,
        "new_tokens": new,
        "engine_config": asdict(config),
        "machine": asdict(rates),
        "step_cost": {k: v for k, v in asdict(cost).items() if k != "cfg"},
        "baseline": {**baseline, "requests": len(base)},
        "points": points,
    }


# --- output -------------------------------------------------------------------------------------


def _ms(d: dict, a: str, b: str, digits: int) -> str:
    """Two of d's second figures as "a / b" milliseconds."""
    return f"{d[a] * 1e3:.{digits}f} / {d[b] * 1e3:.{digits}f}"


SERVING_TABLE = {  # header -> cell from (preset result r, point p)
    "preset": lambda r, p: r["preset"],
    "dtype": lambda r, p: r["dtype"],
    "N": lambda r, p: p["concurrency"],
    "tok/s ours": lambda r, p: f"{p['tok_s']:.1f}",
    "baseline": lambda r, p: f"{r['baseline']['tok_s']:.1f}",
    "ratio": lambda r, p: f"{p['ratio']:.1f}x",
    "TTFT p50 / p99 ms": lambda r, p: _ms(p, "ttft_p50_s", "ttft_p99_s", 0),
    "TPOT p50 / p99 ms": lambda r, p: _ms(p, "tpot_p50_s", "tpot_p99_s", 1),
    "baseline TTFT / TPOT ms": lambda r, p: _ms(r["baseline"], "ttft_p50_s", "tpot_p50_s", 1),
}
BOUND_TABLE = {
    "preset": lambda r, p: r["preset"],
    "N": lambda r, p: p["concurrency"],
    "experts/layer": lambda r, p: f"{p['distinct_experts']:.1f}",
    "weights + KV MB/step": lambda r, p: f"{p['weight_mb']:.1f} + {p['kv_mb']:.1f}",
    "floor ms (bandwidth / compute)": lambda r, p: f"{p['bw_floor_ms']:.2f} / {p['compute_floor_ms']:.2f}",
    "decode step ms": lambda r, p: f"{p['decode_step_s'] * 1e3:.2f}",
    "bound": lambda r, p: p["floor"],
    "at % of floor": lambda r, p: f"{p['of_limit'] * 100:.0f}%",
    "GB/s": lambda r, p: f"{p['achieved_gbps']:.1f}",
    "prefill / decode s": lambda r, p: f"{p['prefill_steps_s']:.1f} / {p['decode_steps_s']:.1f}",
    "tok/s ceiling (÷ baseline)": lambda r, p: f"{p['ceiling_tok_s']:.0f} ({p['ceiling_vs_baseline']:.1f}x)",
}


def _table(columns: dict, results: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        for p in r["points"]:
            lines.append("| " + " | ".join(str(cell(r, p)) for cell in columns.values()) + " |")
    return "\n".join(lines)


def print_results(results: list[dict]) -> None:
    print("\n" + _table(SERVING_TABLE, results) + "\n\n" + _table(BOUND_TABLE, results))
    for r in results:
        m, c = r["machine"], r["engine_config"]
        print(
            f"\n{r['preset']} {r['dtype']}, {r['threads']} threads: plain read {m['read_gbps']:.1f} GB/s, "
            f"GEMV {m['gemv_gbps']:.1f} GB/s, GEMM {m['gemm_gflops']:.0f} GFLOP/s; baseline = "
            f"{r['baseline']['requests']} requests one at a time, its one-stream tok/s used for every N; "
            f"engine block_size {c['block_size']}, kv_cache_tokens {c['kv_cache_tokens']}, max_num_seqs "
            f"{c['max_num_seqs']}, max_num_batched_tokens {c['max_num_batched_tokens']}; prefix-cache hits "
            f"{[p['prefix_cache_hits'] for p in r['points']]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"],
        help=f"for every preset; default per preset: {DEFAULT_DTYPES}",
    )  # fmt: skip
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for both sides (default: torch's); 1 resists a shared machine",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the step thread and the baseline inherit it
    if args.new_tokens < 2 or args.baseline_requests < 1:
        parser.error("--new-tokens must be >= 2 and --baseline-requests >= 1")
    results = []
    for preset in args.presets:
        dtype = getattr(torch, args.dtype or DEFAULT_DTYPES.get(preset, "bfloat16"))
        results.append(bench_preset(preset, dtype, args))
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
