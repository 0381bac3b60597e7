"""Single-level prefix groups (BatchLLM): each request gets at most one shared prefix."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PrefixGroup:
    """Requests that share `prefix_token_ids`; each keeps at least one token of its own.

    A group of one request has an empty prefix (nothing is shared).
    """

    group_id: int
    prefix_token_ids: tuple[int, ...]
    request_ids: tuple[int, ...]  # indices into the input, ascending

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_token_ids)
