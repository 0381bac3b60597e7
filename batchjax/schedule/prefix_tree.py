"""Prompts as one flat token array, and the token-level prefix tree (radix tree) over them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class TokenBatch(Sequence[np.ndarray]):
    """Many prompts held as one flat int32 array, so a million prompts cost no Python objects.

    Prompt i is `tokens[offsets[i]:offsets[i + 1]]`; indexing returns that view.
    """

    tokens: np.ndarray  # [total_tokens] int32, token ids >= 0
    offsets: np.ndarray  # [N + 1] int64, ascending, offsets[0] == 0

    @staticmethod
    def from_sequences(prompts: Sequence[Sequence[int] | np.ndarray]) -> TokenBatch:
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        for i, prompt in enumerate(prompts):
            tokens[offsets[i] : offsets[i + 1]] = prompt
        return TokenBatch(tokens, offsets)

    @staticmethod
    def from_padded(rows: np.ndarray, lengths: np.ndarray | None = None) -> TokenBatch:
        """rows: [N, L] int32. Without `lengths` every row is a whole prompt (a free view)."""
        num_rows, width = rows.shape
        if lengths is None:
            return TokenBatch(
                np.ascontiguousarray(rows, dtype=np.int32).reshape(-1),
                np.arange(num_rows + 1, dtype=np.int64) * width,
            )
        lengths = np.asarray(lengths, dtype=np.int64)
        keep = np.arange(width)[None, :] < lengths[:, None]  # [N, L]
        offsets = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenBatch(np.asarray(rows, dtype=np.int32)[keep], offsets)

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64 prompt lengths."""
        return np.diff(self.offsets)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.tokens[self.offsets[i] : self.offsets[i + 1]]
