"""The cascade (multi-level sharing) against single-level sharing, step by step, same work.

    python -m experiments.bench_cascade [--model=smollm2-135m] [--dtype=float32] [--repeats=5]

Each step does the same tokens over the same contexts both ways: a 512-token system prompt
over documents of 768 tokens, questions of 64. With the tree, a request's context is two
shared segments (system, then document: two cascade levels); with one level, its group's
prefix is the document's whole 1,280 tokens, the system prompt copied into every group.
So any difference in time is what the extra level costs (or, in decode, what reading the
system prompt once for every group's rows saves). On a GPU (`--device=gpu`) the same steps
also report the share of HBM bandwidth their KV reads take.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from batchjax.bench.cascade import PAGE, step_pairs
from batchjax.bench.roofline import matmul_gflops
from batchjax.bench.steps import step_seconds
from batchjax.engine.engine import Engine
from batchjax.schedule.buckets import BucketTable

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model spec.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON.")

def main(argv):
    del argv
    roofline = matmul_gflops(2048, _REPEATS.value)
    engine = Engine(_MODEL.value, dtype=_DTYPE.value, kv_budget_mb=2048, progress=False)
    results = {"matmul_gflops": roofline, "dtype": _DTYPE.value,
               "cpu_kernels": engine.step.cpu_kernels, "steps": {}}
    print(f"matmul roofline: {roofline:.1f} GFLOP/s; cpu kernels: {engine.step.cpu_kernels}")
    feeds = {}
    for name, pair in step_pairs().items():
        row = {}
        for kind, plan in pair.items():
            levels = max((len(c.prefix_chain) for c in plan.chunks), default=1) or 1
            buckets = BucketTable.for_budget(engine.options.max_tokens_per_step, 128, levels)
            if levels not in feeds:
                feeds[levels] = engine.step.empty_feed(buckets.tokens[-1])
            seconds, flops = step_seconds(engine, plan, buckets, feeds[levels], PAGE,
                                          _REPEATS.value)
            row[kind] = {"seconds": seconds, "gflop_per_s": flops / seconds / 1e9,
                         "levels": levels}
        ratio = row["one level"]["seconds"] / row["tree"]["seconds"]
        row["one_level_over_tree"] = ratio
        results["steps"][name] = row
        print(f"{name:<46} tree {row['tree']['seconds'] * 1e3:8.1f} ms   one level "
              f"{row['one level']['seconds'] * 1e3:8.1f} ms   one level / tree {ratio:5.2f}x")
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
