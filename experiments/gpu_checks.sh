#!/usr/bin/env bash
# Every GPU check, for a machine with one NVIDIA GPU and jax[cuda] installed. Logs go to $OUT.
#
#     OUT=out/gpu bash experiments/gpu_checks.sh                 # every part, in this order
#     OUT=out/gpu CHECKS="tests engine" bash experiments/gpu_checks.sh
#
# The parts (CHECKS, space-separated; each has its own time limit):
#   tests      the compiled kernels against their references (pytest's `gpu` mark)
#   engine     a random-weight Llama-3.1-8B (bf16) on 1,024 shared-document requests against
#              transformers' generate and the simulator's estimate; host time per step and
#              device idle (experiments.bench_accelerator)
#   cascade    the cascade decode kernels at depth 2 against depth 1 (a 512-token root under
#              16 documents), time and share of HBM peak (bench_attention --cascade_root)
#   attention  the decode attention benchmark in bf16 (Mosaic GPU and Triton) and f32 (Triton)
#   host       the host's work per step beside the GPU's steps of a tiny model (bench_host)
set -u
OUT=${OUT:-out/gpu}
CHECKS=${CHECKS:-tests engine cascade attention host}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/machine.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/machine.txt"

wants() { case " $CHECKS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if wants tests; then
  timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -m gpu --tb=short -p no:cacheprovider \
    tests/test_pallas_attention.py tests/test_cascade_attention.py tests/test_engine.py 2>&1 \
    | tee "$OUT/tests.txt"
fi

if wants engine; then
  timeout "${ENGINE_TIMEOUT:-420}" $PY -m experiments.bench_accelerator --shape=llama-3.1-8b \
    --num_docs=64 --questions=16 --doc_tokens=1024 --question_tokens=64 --max_tokens=32 \
    --kv_budget_mb=16384 --max_tokens_per_step=2048 --arm_timeout=200 --out="$OUT/engine" \
    2>&1 \
    | tee "$OUT/engine.txt"
fi

if wants cascade; then
  timeout "${BENCH_TIMEOUT:-100}" $PY -m experiments.bench_attention --device=gpu \
    --dtype=bfloat16 --groups=16 --prefix_len=1280 --cascade_root=512 --iters=20 2>&1 \
    | tee "$OUT/cascade.txt"
fi

if wants attention; then
  bench() {
    timeout "${BENCH_TIMEOUT:-100}" $PY -m experiments.bench_attention --device=gpu "$@" 2>&1 \
      | tee -a "$OUT/bench.txt"
  }
  bench --dtype=bfloat16 --groups=16 --iters=20
  bench --dtype=bfloat16 --groups=4 --iters=20
  bench --dtype=float32 --groups=16 --iters=10
fi

if wants host; then
  timeout "${BENCH_TIMEOUT:-100}" $PY -m experiments.bench_host --repeats=3 --out="$OUT/host" \
    2>&1 | tee "$OUT/host.txt"
fi
