"""Tensor-parallel overhead per step, on host devices forced out of this machine's cores.

    python -m experiments.bench_tensor_parallel [--model=smollm2-135m] [--tensor_parallel=1,3] \
        [--devices=3] [--repeats=5] [--placements=TABLE/HEAD,...|all] \
        [--only=NAME,...] [--json_out=PATH]

Forced host devices share the same cores, so splitting a step over them cannot make it
faster: what this measures is what the split costs (the all-reduces, the logits gather, the
smaller per-device products and the partitioned program), step by step against T=1 in the
same process and on the same step layouts as `experiments.bench_engine`. On real chips the
same program divides the work over them; the simulator (`experiments.simulate
--tensor_parallel`) estimates that.

`--placements` times each tensor-parallel size > 1 once per placement of the embedding table
and the LM head ("TABLE/HEAD", `batchjax.sharding.rules`: e.g. `replicated/vocab`, the
default, `vocab/vocab`, `embed/embed`; `all` for every one); T=1 runs the default. Every
engine is built first (one load of the model, one KV pool per size, handed from engine to
engine); then each step is timed `--repeats` times on every engine in turn, in reverse order
every other turn, so that other work on the machine falls on all of them alike. A figure is
the median; a ratio is the median over turns of the ratio of two engines' times in the same
turn, with its interquartile range.
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
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from batchjax.engine.engine import Engine, dtype_of  # noqa: E402
from batchjax.engine.page_pool import kv_bytes_per_page  # noqa: E402
from batchjax.engine.sampling import sampling_row_arrays  # noqa: E402
from batchjax.engine.step import StepVariant  # noqa: E402
from batchjax.engine.step_batch import build_step_batch  # noqa: E402
from batchjax.models.registry import load_model  # noqa: E402
from batchjax.schedule.buckets import BucketTable  # noqa: E402
from batchjax.sharding import rules  # noqa: E402
from batchjax.sharding.tensor_parallel import Layout  # noqa: E402
# The step layouts and the flags --model, --dtype, --repeats, --only and --json_out are
# experiments.bench_engine's.
from experiments.bench_engine import (PAGE, _DTYPE, _JSON, _MODEL, _ONLY,  # noqa: E402
                                      _REPEATS, step_plans)

_TP = flags.DEFINE_list("tensor_parallel", ["1", "3"], "Tensor-parallel sizes to time.")
flags.DEFINE_integer("devices", 3, "Host devices to force (read before JAX starts).")
_PLACEMENTS = flags.DEFINE_list(
    "placements", ["/".join(rules.DEFAULT_PLACEMENT)],
    "Placements TABLE/HEAD of the embedding table and the LM head to time at each size > 1 "
    "('all': every one).")
_DEFAULT_STEPS = ("prefill 512", "decode 64 over shared prefix 1024 (4 x 16)", "decode 256",
                  "decode 16 over own")


def _placements() -> list[str]:
    if _PLACEMENTS.value == ["all"]:
        return [f"{t}/{h}" for t in rules.EMBED_PLACEMENTS for h in rules.HEAD_PLACEMENTS]
    for p in _PLACEMENTS.value:
        rules.parse_placement(p)  # fails early on a typo
    return list(_PLACEMENTS.value)


def label(arm: tuple[int, str]) -> str:
    return f"T={arm[0]}" + (f" {arm[1]}" if arm[0] > 1 else "")


def main(argv):
    del argv
    sizes = [int(t) for t in _TP.value]
    only = _ONLY.value or _DEFAULT_STEPS
    plans = {name: plan for name, plan in step_plans().items()
             if any(part in name for part in only)}
    default = "/".join(rules.DEFAULT_PLACEMENT)
    arms = [(t, p) for t in sizes for p in (_placements() if t > 1 else [default])]
    dtype = dtype_of(_DTYPE.value)
    loaded = load_model(_MODEL.value, dtype=dtype)
    # One KV pool per size, as large as the plans' pages need, handed from engine to engine
    # (the placement does not change the pools' layout).
    pages = 1 + max(p for plan in plans.values() for part in plan.chunks + plan.prefixes
                    for p in part.page_table)
    engines, pools = {}, {}
    for t, placement in arms:
        kv_heads = Layout.for_model(loaded.config, t).pool_kv_heads
        page_mb = kv_bytes_per_page(loaded.config, PAGE, dtype, kv_heads) / 2**20
        engine = Engine(_MODEL.value, dtype=_DTYPE.value, page_size=PAGE, progress=False,
                        tensor_parallel=t, loaded=loaded, placement=placement,
                        kv_budget_mb=(pages if t not in pools else 1) * page_mb * 1.01)
        if t not in pools:
            pools[t] = engine.kv
        engine.kv = None  # the size's pool is handed to it when it runs
        engines[t, placement] = engine
    buckets = BucketTable.for_budget(engines[arms[0]].options.max_tokens_per_step, 69)
    feeds = {t: engines[t, p].step.empty_feed(buckets.tokens[-1]) for t, p in arms}
    times: dict[tuple[int, str], dict[str, list[float]]] = {a: {n: [] for n in plans}
                                                           for a in arms}
    for name, plan in plans.items():
        batch = build_step_batch(plan, PAGE, buckets)
        rows = sampling_row_arrays(batch.logits_index.shape[0],
                                   positions=batch.sample_positions)

        def seconds(arm) -> float:
            t, engine = arm[0], engines[arm]
            engine.kv = pools[t]
            try:
                start = time.perf_counter()
                tokens, _, engine.kv, _ = engine.step(engine.kv, feeds[t], batch, rows,
                                                      StepVariant())
                jax.block_until_ready(tokens)
                return time.perf_counter() - start
            finally:
                pools[t], engine.kv = engine.kv, None

        for arm in arms:
            seconds(arm)  # compile and warm up
        for r in range(_REPEATS.value):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                times[arm][name].append(seconds(arm))
        print(f"{name}: " + ", ".join(
            f"{label(a)} {statistics.median(times[a][name]) * 1000:.1f} ms" for a in arms),
            flush=True)

    def ratio(a, b, name) -> str:
        """Median and interquartile range over turns of a's time over b's in the same turn."""
        r = [x / y for x, y in zip(times[a][name], times[b][name])]
        if len(r) < 2:
            return f"{r[0]:.2f}x"
        q1, q2, q3 = statistics.quantiles(r, n=4, method="inclusive")
        return f"{q2:.2f}x ({q1:.2f}-{q3:.2f})"

    def table(title, rows, cell):
        """One row per arm of `rows`, one column per step: `cell(arm, step name)`."""
        print(f"\n{title}")
        print("| size, placement | " + " | ".join(plans) + " |")
        print("|---" + "|---:" * len(plans) + "|")
        for a in rows:
            print(f"| {label(a)} | " + " | ".join(cell(a, name) for name in plans) + " |")

    base = arms[0]
    table(f"median of {_REPEATS.value} turns, in ms", arms,
          lambda a, name: f"{statistics.median(times[a][name]) * 1000:.1f}")
    table(f"ratio to {label(base)} (interquartile range over turns)", arms[1:],
          lambda a, name: ratio(a, base, name))
    others = [a for a in arms if a[0] > 1 and a[1] != default]
    if others and all((a[0], default) in times for a in others):
        table(f"ratio to the default placement {default} at the same size", others,
              lambda a, name: ratio(a, (a[0], default), name))
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump({"model": _MODEL.value, "dtype": _DTYPE.value, "repeats": _REPEATS.value,
                       "seconds": {label(a): times[a] for a in arms}}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
