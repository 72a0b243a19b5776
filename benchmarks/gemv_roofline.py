"""The memory-bandwidth ceiling of batch-1 decode on this machine.

Decode at batch 1 multiplies one activation row by every weight matrix it touches: a GEMV per
matrix, bounded by how fast the weights stream from DRAM. This measures that rate for the
decoder's matrix shapes, cycling over more weights than any cache holds (as a decode step
does), and a plain read of the same bytes for comparison. Usage:

    python benchmarks/gemv_roofline.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(11264, 2048), (2048, 11264), (2816, 2048), (2048, 1408), (3072, 2048)]  # [out, in]
WORKING_SET_BYTES = 1 << 30


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dtype, rounds = getattr(torch, args.dtype), args.rounds
    print(f"threads {torch.get_num_threads()}, dtype {dtype}")
    for out_f, in_f in SHAPES:
        size = out_f * in_f * torch.empty((), dtype=dtype).element_size()
        weights = [torch.randn(out_f, in_f).to(dtype) for _ in range(max(2, WORKING_SET_BYTES // size))]
        x = torch.randn(1, in_f).to(dtype)
        for w in weights[:2]:
            F.linear(x, w)
        start = time.perf_counter()
        for _ in range(rounds):
            for w in weights:
                F.linear(x, w)
        gemv = size * len(weights) * rounds / (time.perf_counter() - start) / 1e9
        start = time.perf_counter()
        for _ in range(rounds):
            for w in weights:
                w.sum()
        read = size * len(weights) * rounds / (time.perf_counter() - start) / 1e9
        print(f"[{out_f}, {in_f}]: GEMV {gemv:.1f} GB/s, plain read (sum) {read:.1f} GB/s")


if __name__ == "__main__":
    main()
