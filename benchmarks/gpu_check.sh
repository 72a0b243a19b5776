#!/usr/bin/env bash
# The GPU checks, as one command for a lent H100/H200 (about 6 minutes; each step has a limit):
#   1. the Triton kernels against their PyTorch references (pytest -m gpu), and their speed and
#      achieved bandwidth at the release's MoE shapes (bench_moe.py);
#   2. decode steps of a real-width checkpoint (`mid`: the release's widths, 2 layers) at batch
#      1/16/64, eager and captured (CUDA graphs), against the card's read bandwidth
#      (bench_decode_capture.py measures both in the same process);
#   3. a short `kimi-vl serve` on the GPU and `kimi-vl bench` against it.
# Everything it measured goes to $OUT (default: gpu_check/) as logs and JSON, and a summary to
# $OUT/summary.md for BENCHMARKS.md. Without a CUDA device it says so and exits 2 at once.
#
#   bash benchmarks/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing measured" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, log it, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name" >&2
  if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "gpu_check: $name failed (see $OUT/$name.log)" >&2
    status=1
  fi
  tail -n 25 "$OUT/$name.log" >&2
}

step kernels-tests 150 python -m pytest -q -m gpu tests/test_kernel_routing.py tests/test_kernel_align.py \
  tests/test_kernel_experts.py tests/test_compiled_decode.py
step kernels-speed 120 python benchmarks/bench_moe.py --tokens 1 16 64 4096 --dtype bfloat16 --out "$OUT/moe.json"
step decode 180 python benchmarks/bench_decode_capture.py --dtype bfloat16 --batches 1 16 64 --mode cudagraph \
  --rounds 3 --steps 16 --out "$OUT/decode.json"

# 3. serve + bench: the tiny checkpoint's widths say nothing about speed, so `mid` in bf16
CKPT="$OUT/mid"
[ -f "$CKPT/config.json" ] || kimi-vl make-checkpoint "$CKPT" --preset mid --dtype bfloat16 >/dev/null
kimi-vl serve --checkpoint "$CKPT" --device cuda --http-port 8300 --grpc-port 8301 \
  --served-model-name kimi >"$OUT/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8300/health >/dev/null && break; sleep 1; done
step serve-bench 120 kimi-vl bench --url http://127.0.0.1:8300 --concurrency 1 16 64 --num-requests 64 \
  --max-tokens 64 --ignore-eos --no-progress --json "$OUT/bench.json"
kill -TERM "$SERVE" 2>/dev/null
wait "$SERVE" 2>/dev/null

python - "$OUT" <<'PY' >"$OUT/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"GPU: {(out / 'gpu.txt').read_text().strip()}\n")
for name in ("moe", "decode", "bench"):
    path = out / f"{name}.json"
    print(f"## {name}\n")
    print("```\n" + (json.dumps(json.loads(path.read_text()), indent=1)[:4000] if path.exists() else "missing") + "\n```\n")
PY
echo "gpu_check: summary in $OUT/summary.md (status $status)" >&2
exit $status
