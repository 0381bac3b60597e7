"""The one table of static shapes every step is padded to.

XLA compiles one program per input shape, so each dimension of a step (tokens, decode rows,
query blocks, ...) is rounded up to the next entry of its ladder. The same table drives warm-up
and run time; the number of distinct shapes a run produces is reported as
`num_compiled_shapes`.
"""

from __future__ import annotations

import bisect
import dataclasses


def powers_of_two_and_a_half(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 1.5 lo, 2 lo, 3 lo, 4 lo, ...: at most a third of a padded size is padding."""
    out = set()
    for n in powers_of_two(lo, hi):
        out.update((n, min(hi, n * 3 // 2)))
    return tuple(sorted(out))


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    out.append(hi)
    return tuple(out)


def _coarse(ladder: tuple[int, ...]) -> tuple[int, ...]:
    """The powers of two of a ladder, and its top."""
    return tuple(n for n in ladder[:-1] if n & (n - 1) == 0) + ladder[-1:]


@dataclasses.dataclass(frozen=True)
class BucketTable:
    """Ladders per step dimension; a size above a ladder's top is an error, not a new shape."""

    # Ladders of 1, 1.5, 2, 3, 4, ... times a power of two: a padded token, row or block costs
    # as much as a real one, and powers of two alone left up to half of a step as padding
    # (68 decode rows ran as 128).
    tokens: tuple[int, ...] = powers_of_two_and_a_half(16, 1024)
    # A step without rows or blocks of a kind pads them to 0, so their attention costs nothing.
    rows: tuple[int, ...] = (0,) + powers_of_two_and_a_half(8, 1024)  # single-query rows
    blocks: tuple[int, ...] = (0,) + powers_of_two_and_a_half(1, 1024)  # query blocks
    # Pages per page table: per-request attention reads every padded page, so a finer ladder.
    pages: tuple[int, ...] = powers_of_two_and_a_half(4, 4096)

    @staticmethod
    def round_up(ladder: tuple[int, ...], n: int, what: str) -> int:
        i = bisect.bisect_left(ladder, n)
        if i == len(ladder):
            raise ValueError(f"{what}={n} exceeds the largest bucket {ladder[-1]}")
        return ladder[i]

    def tokens_bucket(self, n: int) -> int:
        return self.round_up(self.tokens, n, "tokens")

    def rows_bucket(self, n: int) -> int:
        return self.round_up(self.rows, n, "rows")

    def blocks_bucket(self, n: int) -> int:
        return self.round_up(self.blocks, n, "blocks")

    def pages_bucket(self, n: int) -> int:
        return self.round_up(self.pages, n, "pages")

    def context_pages_bucket(self, n: int) -> int:
        """Pages of a continuing chunk's earlier keys: a power of two (it depends on where a
        prompt was split, a second free dimension; the finer ladder doubled a run's shapes)."""
        return self.round_up(_coarse(self.pages), n, "context pages")

    def window_bucket(self, n: int, num_rows: int) -> int:
        """Rows a query tile reads back in a step of `num_rows`: a power of two, or the step."""
        return min(self.round_up(_coarse(self.tokens), n, "window rows"), num_rows)

    @classmethod
    def for_budget(cls, max_tokens_per_step: int) -> "BucketTable":
        """Ladders whose tops cover a step of `max_tokens_per_step` tokens."""
        top = 1 << max(4, (max_tokens_per_step - 1).bit_length())
        return cls(
            tokens=powers_of_two_and_a_half(16, top),
            rows=(0,) + powers_of_two_and_a_half(8, max(8, top)),
            blocks=(0,) + powers_of_two_and_a_half(1, max(2, top)),
        )
