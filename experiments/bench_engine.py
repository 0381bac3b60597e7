"""Steady engine steps against the machine's matmul roofline, measured in the same run.

    python -m experiments.bench_engine [--model=smollm2-135m] [--dtype=float32] [--repeats=5] \
        [--cpu_kernels=auto|native|xla]

Times the jitted engine step (after its compile) on the shapes a batch spends its time in: a
512-token prefill chunk; the 64-token distinct parts of 8 requests of a group after their
shared 1024-token prefix; 64 and 256 decode tokens of 4 and 16 groups x 16 requests over a
shared 1024-token prefix (the batchllm layout; the larger step is what a batch with many
groups decodes in) and 64 of 16 groups x 4; and 64 decode tokens of independent requests over
1088-token contexts (the layout of the `none`/`vllm` policies), and 16 and 4 of them over
576-token contexts (the small decode steps a batch ends with; 4 rows run padded to 16).
Model FLOP utilisation is the step's useful matmul FLOPs per second over the GFLOP/s of a
large `jnp.dot` timed here.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from batchjax.bench.roofline import matmul_gflops
from batchjax.bench.steps import step_seconds
from batchjax.engine.engine import Engine
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.step_plan import ChunkWork, PrefixRef, StepPlan

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model spec.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON.")
_KERNELS = flags.DEFINE_enum("cpu_kernels", "auto", ["auto", "native", "xla"],
                             "Native CPU kernels or XLA's code (see batchjax.kernels).")
_ONLY = flags.DEFINE_list("only", [], "Time only the steps whose names contain one of these.")

PAGE = 16


def _pages(start: int, n: int) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def step_plans() -> dict[str, StepPlan]:
    prefill = StepPlan(0, (ChunkWork(0, (5,) * 512, 64, _pages(1, 36), None, 0, True),), ())
    prefix_len, degree = 1024, 16

    def decode_shared(groups: int, degree: int = degree) -> StepPlan:
        prefixes = tuple(PrefixRef(g, _pages(1 + g * 64, 64), prefix_len) for g in range(groups))
        own_start = 1 + groups * 64
        shared = tuple(
            ChunkWork(g * degree + i, (5,), 80, _pages(own_start + (g * degree + i) * 6, 6), g,
                      prefix_len, True, True)
            for g in range(groups) for i in range(degree))
        return StepPlan(0, shared, prefixes)

    # 8 requests of one group prefill their 64-token distinct parts after the shared prefix.
    suffix = StepPlan(0, tuple(
        ChunkWork(i, (5,) * 64, 0, _pages(65 + i * 4, 4), 0, prefix_len, True)
        for i in range(8)), (PrefixRef(0, _pages(1, 64), prefix_len),))

    own = tuple(ChunkWork(i, (5,), 1087, _pages(1 + i * 69, 69), None, 0, True, True)
                for i in range(64))
    decode_own = StepPlan(0, own, ())
    small = tuple(ChunkWork(i, (5,), 575, _pages(1 + i * 37, 37), None, 0, True, True)
                  for i in range(16))
    return {"prefill 512 (context 576)": prefill,
            "suffix prefill 8 x 64 over shared prefix 1024": suffix,
            "decode 16 over shared prefix 1024 (1 x 16)": decode_shared(1),
            "decode 64 over shared prefix 1024 (4 x 16)": decode_shared(4),
            "decode 64 over shared prefix 1024 (16 x 4)": decode_shared(16, 4),
            "decode 256 over shared prefix 1024 (16 x 16)": decode_shared(16),
            "decode 64 over own context 1088": decode_own,
            "decode 16 over own context 576": StepPlan(0, small, ()),
            # A batch's last steps, as its requests finish: 4 rows, padded to 16 tokens.
            "decode 4 over own context 576": StepPlan(0, small[:4], ())}


def main(argv):
    del argv
    roofline = matmul_gflops(2048, _REPEATS.value)
    # 4 GiB: the own-context step holds 64 x 69 pages (3.2 GiB of f32 SmolLM2 KV).
    engine = Engine(_MODEL.value, dtype=_DTYPE.value, kv_budget_mb=4096, progress=False,
                    cpu_kernels=_KERNELS.value)
    results = {"matmul_gflops": roofline, "dtype": _DTYPE.value,
               "cpu_kernels": engine.step.cpu_kernels, "steps": {}}
    print(f"matmul roofline: {roofline:.1f} GFLOP/s ({_DTYPE.value} weights, f32 matmul); "
          f"cpu kernels: {engine.step.cpu_kernels}")
    # Page tables as wide as the longest own context here (69 pages), as a job of such
    # requests would have them.
    buckets = BucketTable.for_budget(engine.options.max_tokens_per_step, 69)
    feed = engine.step.empty_feed(buckets.tokens[-1])
    for name, plan in step_plans().items():
        if _ONLY.value and not any(part in name for part in _ONLY.value):
            continue
        used = max(p for part in plan.chunks + plan.prefixes for p in part.page_table)
        if used >= engine.kv_budget_pages:  # XLA's gather would clamp, timing other pages
            raise ValueError(f"{name}: page {used} outside the pool's "
                             f"{engine.kv_budget_pages}; raise kv_budget_mb")
        seconds, flops = step_seconds(engine, plan, buckets, feed, PAGE, _REPEATS.value)
        gflops = flops / seconds / 1e9
        results["steps"][name] = {"seconds": seconds, "gflop_per_s": gflops,
                                  "mfu": gflops / roofline}
        print(f"{name:<47} {seconds * 1000:8.1f} ms  {gflops:7.1f} GFLOP/s  "
              f"MFU {gflops / roofline:5.1%}")
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
