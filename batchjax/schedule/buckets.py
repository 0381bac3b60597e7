"""The one table of static shapes every step is padded to.

XLA compiles one program per input shape, and on a TPU one program costs seconds to minutes.
So a step's shape has two free dimensions, both from short ladders: its token count `T`, a
power of two, and its sampled rows, `T` or a small bucket below it (a prefill step samples a
few rows, a decode step nearly all). Everything else a step carries is sized from `T` and from
the page-table width, fixed for a whole job (`PagedAttentionMetadata`). The table lists every
shape up front, so the engine compiles them all before the first request runs, and the
number a run compiles, `num_compiled_shapes`, is small by construction.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

from batchjax.schedule.step_plan import SchedRequest


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    out.append(hi)
    return tuple(out)


MIN_TOKENS = 16
MAX_TOKEN_SIZES = 8  # the ladder starts higher for large step budgets


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The compiled shape of a step: padded tokens, padded sampled rows, page-table width,
    and the cascade levels of shared segments its attention runs (fixed for a job)."""

    tokens: int
    sampled: int
    table_pages: int
    prefix_levels: int = 1


@dataclasses.dataclass(frozen=True)
class BucketTable:
    """Token ladder and page-table width of a job; a size above the top is an error, not a new
    shape."""

    tokens: tuple[int, ...] = powers_of_two(MIN_TOKENS, 512)
    table_pages: int = 64  # pages in every page table of a step (own and prefix)
    prefix_levels: int = 1  # shared segments a sequence's chain may hold (cascade levels)

    def __post_init__(self) -> None:
        if self.prefix_levels < 1:
            raise ValueError(f"prefix_levels must be >= 1, got {self.prefix_levels}")

    @staticmethod
    def round_up(ladder: tuple[int, ...], n: int, what: str) -> int:
        i = bisect.bisect_left(ladder, n)
        if i == len(ladder):
            raise ValueError(f"{what}={n} exceeds the largest bucket {ladder[-1]}")
        return ladder[i]

    def tokens_bucket(self, n: int) -> int:
        return self.round_up(self.tokens, n, "tokens")

    @staticmethod
    def small_sampled(tokens: int) -> int:
        """The sampled-rows bucket below `tokens`: an eighth of it (at least 16)."""
        return min(tokens, max(MIN_TOKENS, tokens // 8))

    def shape(self, num_tokens: int, num_sampled: int) -> StepShape:
        t = self.tokens_bucket(num_tokens)
        small = self.small_sampled(t)
        return StepShape(t, small if num_sampled <= small else t, self.table_pages,
                         self.prefix_levels)

    def shapes(self, max_tokens: int | None = None,
               max_sampled: int | None = None) -> tuple[StepShape, ...]:
        """Every shape a step of at most `max_tokens` tokens and `max_sampled` sampled rows
        can take: what warm-up compiles."""
        top = self.tokens[-1] if max_tokens is None else self.tokens_bucket(max_tokens)
        out = []
        for t in self.tokens:
            if t > top:
                break
            small = self.small_sampled(t)
            out.append(StepShape(t, small, self.table_pages, self.prefix_levels))
            if small < t and (max_sampled is None or max_sampled > small):
                out.append(StepShape(t, t, self.table_pages, self.prefix_levels))
        return tuple(out)

    def job_shapes(self, requests: Sequence[SchedRequest],
                   max_tokens_per_step: int) -> tuple[StepShape, ...]:
        """Every shape a job of `requests` can take: no step holds more tokens than the job
        has work, nor more logits rows than its requests sample and score."""
        work = sum(len(r.prompt_token_ids) + r.max_tokens for r in requests)
        rows = sum(r.logits_rows for r in requests)
        return self.shapes(min(max_tokens_per_step, work), rows)

    @classmethod
    def for_job(cls, requests: Sequence[SchedRequest], max_tokens_per_step: int,
                page_size: int, prefix_levels: int = 1) -> "BucketTable":
        """The table of a job: page tables as wide as its longest request can grow."""
        longest = max(len(r.prompt_token_ids) + r.max_tokens for r in requests)
        return cls.for_budget(max_tokens_per_step, -(-longest // page_size), prefix_levels)

    @classmethod
    def for_budget(cls, max_tokens_per_step: int, table_pages: int,
                   prefix_levels: int = 1) -> "BucketTable":
        """A ladder whose top covers a step of `max_tokens_per_step` tokens, at most
        `MAX_TOKEN_SIZES` long; page tables `table_pages` wide (rounded up to a power of two,
        so jobs of similar lengths share programs)."""
        top = 1 << max(4, (max_tokens_per_step - 1).bit_length())
        lo = max(MIN_TOKENS, top >> (MAX_TOKEN_SIZES - 1))
        return cls(tokens=powers_of_two(lo, top),
                   table_pages=1 << max(0, (max(1, table_pages) - 1).bit_length()),
                   prefix_levels=max(1, prefix_levels))
