"""One engine step timed on a hand-made `StepPlan`: what the step benchmarks measure."""

from __future__ import annotations

from batchjax.bench.roofline import median_seconds
from batchjax.engine.engine import step_flops
from batchjax.engine.sampling import sampling_row_arrays
from batchjax.engine.step import StepVariant
from batchjax.engine.step_batch import build_step_batch


def step_seconds(engine, plan, buckets, feed, page_size: int,
                 repeats: int) -> tuple[float, float]:
    """(median seconds of `engine`'s jitted step on `plan` after its compile, the step's
    useful FLOPs). `buckets` lays the plan out; `feed` is `engine.step.empty_feed` of them."""
    batch = build_step_batch(plan, page_size, buckets)
    rows = sampling_row_arrays(batch.logits_index.shape[0], positions=batch.sample_positions)

    def run():
        tokens, _, engine.kv, _ = engine.step(engine.kv, feed, batch, rows, StepVariant())
        return tokens

    seconds = median_seconds(run, repeats)
    return seconds, step_flops(engine.config, batch)
