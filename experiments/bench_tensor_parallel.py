"""Tensor-parallel overhead per step, on host devices forced out of this machine's cores.

    python -m experiments.bench_tensor_parallel [--model=smollm2-135m] [--tensor_parallel=1,3] \
        [--devices=3] [--repeats=5] [--only=NAME,...] [--json_out=PATH]

Forced host devices share the same cores, so splitting a step over them cannot make it
faster: what this measures is what the split costs (the all-reduces, the logits gather, the
smaller per-device products and the partitioned program), step by step against T=1 in the
same process and on the same step layouts as `experiments.bench_engine`. On real chips the
same program divides the work over them; the simulator (`experiments.simulate
--tensor_parallel`) estimates that.
"""

from __future__ import annotations

import os
import sys


def _force_devices(argv) -> None:
    # The host device count is read once, when JAX starts: set it before anything imports it.
    count = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "3")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")


_force_devices(sys.argv)

import json  # noqa: E402

from absl import app, flags  # noqa: E402

from batchjax.bench.steps import step_seconds  # noqa: E402
from batchjax.engine.engine import Engine  # noqa: E402
from batchjax.schedule.buckets import BucketTable  # noqa: E402
# The step layouts and the flags --model, --dtype, --repeats, --only and --json_out are
# experiments.bench_engine's.
from experiments.bench_engine import (PAGE, _DTYPE, _JSON, _MODEL, _ONLY,  # noqa: E402
                                      _REPEATS, step_plans)

_TP = flags.DEFINE_list("tensor_parallel", ["1", "3"], "Tensor-parallel sizes to time.")
flags.DEFINE_integer("devices", 3, "Host devices to force (read before JAX starts).")
_DEFAULT_STEPS = ("prefill 512", "decode 64 over shared prefix 1024 (4 x 16)", "decode 256",
                  "decode 16 over own")


def main(argv):
    del argv
    sizes = [int(t) for t in _TP.value]
    only = _ONLY.value or _DEFAULT_STEPS
    plans = {name: plan for name, plan in step_plans().items()
             if any(part in name for part in only)}
    times: dict[int, dict[str, float]] = {}
    for t in sizes:
        engine = Engine(_MODEL.value, dtype=_DTYPE.value, kv_budget_mb=4096, progress=False,
                        tensor_parallel=t)
        buckets = BucketTable.for_budget(engine.options.max_tokens_per_step, 69)
        feed = engine.step.empty_feed(buckets.tokens[-1])
        times[t] = {}
        for name, plan in plans.items():
            times[t][name], _ = step_seconds(engine, plan, buckets, feed, PAGE, _REPEATS.value)
            print(f"T={t} {name:<47} {times[t][name] * 1000:8.1f} ms", flush=True)
        del engine
    base = sizes[0]
    print(f"\n| step | " + " | ".join(f"T={t} (ms)" for t in sizes) + " | " +
          " | ".join(f"T={t} / T={base}" for t in sizes[1:]) + " |")
    print("|---" * (1 + 2 * len(sizes) - 1) + "|")
    for name in plans:
        cells = [f"{times[t][name] * 1000:.1f}" for t in sizes]
        ratios = [f"{times[t][name] / times[base][name]:.2f}x" for t in sizes[1:]]
        print(f"| {name} | " + " | ".join(cells + ratios) + " |")
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump({"model": _MODEL.value, "dtype": _DTYPE.value,
                       "seconds": {str(t): v for t, v in times.items()}}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
