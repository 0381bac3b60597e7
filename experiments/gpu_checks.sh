#!/usr/bin/env bash
# Every GPU check in one run, for a machine with one NVIDIA GPU and jax[cuda] installed:
# the compiled kernels against their references (pytest's `gpu` mark), then the decode
# attention benchmark in bf16 (Mosaic GPU and Triton) and f32 (Triton), then the host's work
# per step beside the GPU's steps of a tiny model (bench_host). Logs go to $OUT.
#
#     OUT=out/gpu bash experiments/gpu_checks.sh
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/machine.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/machine.txt"

timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -m gpu --tb=short -p no:cacheprovider \
  tests/test_pallas_attention.py tests/test_cascade_attention.py tests/test_engine.py 2>&1 | tee "$OUT/tests.txt"

bench() {
  timeout "${BENCH_TIMEOUT:-100}" $PY -m experiments.bench_attention --device=gpu "$@" 2>&1 \
    | tee -a "$OUT/bench.txt"
}
bench --dtype=bfloat16 --groups=16 --iters=20
bench --dtype=bfloat16 --groups=4 --iters=20
bench --dtype=float32 --groups=16 --iters=10

timeout "${BENCH_TIMEOUT:-100}" $PY -m experiments.bench_host --repeats=3 --out="$OUT/host" 2>&1 \
  | tee "$OUT/host.txt"
