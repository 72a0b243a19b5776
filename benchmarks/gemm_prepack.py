"""Small-batch GEMMs at the decoder's dense MLP shape: `F.linear` vs a oneDNN-prepacked weight.

Decode multiplies M = 1..64 rows by [11264, 2048] weights (the dense MLP's gate/up; `--shape` for
others). Cycling over at least eight such weights and at least 600 MiB (740 MB at the default fp32
shape, more than the caches hold, as a decode step does), it reports
each variant's weight-read rate: `F.linear` (MKL, the weight as stored), `x @ W.T` with the
transpose stored contiguous, and `mkldnn._linear_pointwise` over a weight laid out once by
`mkldnn._reorder_linear_weight` (what `services/decoder/model/prepack.py` does), and for one row
`torch.mv` (the GEMV `prepack.one_row_linear` takes in bf16). Usage:

    python benchmarks/gemm_prepack.py --dtype float32
    python benchmarks/gemm_prepack.py --dtype bfloat16 --shape 2048 1408
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _rate(run: Callable[[int], object], count: int, nbytes: int, rounds: int = 3) -> float:
    for i in range(2):
        run(i)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(count):
            run(i)
        times.append((time.perf_counter() - start) / count)
    return nbytes / statistics.median(times) / 1e9


def _rates(
    x: torch.Tensor, weights: list[torch.Tensor], transposed: list[torch.Tensor], nbytes: int
) -> tuple[float, float, float]:
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0]) for w in weights]
    return (
        _rate(lambda i: F.linear(x, weights[i]), len(weights), nbytes),
        _rate(lambda i: x @ transposed[i], len(weights), nbytes),
        _rate(
            lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
            len(weights),
            nbytes,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--shape", type=int, nargs=2, default=[11264, 2048], metavar=("OUT", "IN"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    n, k = args.shape
    nbytes = n * k * torch.empty((), dtype=dtype).element_size()
    count = max(8, (600 << 20) // nbytes)  # past the caches
    weights = [torch.randn(n, k).to(dtype) for _ in range(count)]
    transposed = [w.t().contiguous() for w in weights]
    print(f"threads {torch.get_num_threads()}, dtype {dtype}, weight [{n}, {k}]; weight-read rate, GB/s")
    for m in args.rows:
        x = torch.randn(m, k).to(dtype)
        linear, plain_t, onednn = _rates(x, weights, transposed, nbytes)
        line = (
            f"M={m:3d}: F.linear {linear:5.1f}  x @ W.T (contiguous) {plain_t:5.1f}  prepacked {onednn:5.1f}"
        )
        if m == 1:
            row = x[0]
            gemv = _rate(lambda i, row=row: torch.mv(weights[i], row), len(weights), nbytes)
            line += f"  torch.mv {gemv:5.1f}"
        print(line)


if __name__ == "__main__":
    main()
