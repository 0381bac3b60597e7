"""The one loop that drives a batcher: the engine, the simulator and the tests all run it.

An executor launches a step and later collects what it sampled. With `overlap`, step N+1 is
planned and launched before step N's tokens are collected: the executor reports placeholders
for step N at once (with the finishes its token counts decide), the batcher plans on them,
and the real tokens (and the finishes they decide: EOS, stop tokens, stop strings) come back
one step late. A request that such a token finishes runs at most one extra step, whose output
is dropped, so the results are those of the synchronous loop.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from batchjax.schedule.batching import Batcher
from batchjax.schedule.step_plan import SampledToken, StepPlan


class StepExecutor(Protocol):
    def launch(self, plan: StepPlan) -> Any:
        """Starts the step; returns a handle, without waiting for the step to finish."""

    def provisional(self, plan: StepPlan, handle: Any) -> Sequence[SampledToken]:
        """What the step sampled as far as the host knows now: a token (or placeholder) per
        sampling chunk of a request still running, finished where its length ends it."""

    def collect(self, plan: StepPlan, handle: Any) -> Sequence[SampledToken]:
        """Waits for the step; the real tokens of the rows `provisional` reported."""


def run_batcher(batcher: Batcher, executor: StepExecutor, *, overlap: bool = False) -> None:
    """Runs `batcher` to the end through `executor`."""
    in_flight = None  # (plan, handle) of the step whose tokens are not collected yet
    while batcher.has_work():
        plan = batcher.next_step()
        handle = executor.launch(plan)
        if in_flight is not None:
            batcher.resolve(executor.collect(*in_flight))
        batcher.complete(plan, executor.provisional(plan, handle))
        in_flight = (plan, handle)
        if not overlap:
            batcher.resolve(executor.collect(*in_flight))
            in_flight = None
    if in_flight is not None:
        batcher.resolve(executor.collect(*in_flight))
