"""Values that cross from the schedule to whoever executes it (the engine or the simulator).

A policy's batcher emits one `StepPlan` per step; the executor runs it and reports back, for
every chunk that sampled, the token it produced and whether the request finished. An executor
that overlaps steps reports a placeholder first (`placeholder_token`, with the finishes that
the token count alone decides) and the real token one step later (`Batcher.resolve`). The batcher
owns all KV page ids (page 0 is reserved as the null page that padding writes to), so the
engine and the simulator account memory identically.
"""

from __future__ import annotations

import dataclasses

NULL_PAGE = 0  # never allocated: padding tokens write their KV here


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Limits every step respects."""

    max_tokens_per_step: int
    kv_budget_pages: int  # usable pages, not counting the null page
    page_size: int
    max_num_seqs: int | None = None  # request cap of the `none`/`vllm` baselines


@dataclasses.dataclass(frozen=True)
class PrefixRef:
    """A shared segment as the executor sees it: pages and length (its KV is computed).

    `group_id` names the segment (in single-level sharing, a group's whole prefix); `level`
    is its place in the chains that attend it (0: top-level), the cascade level its
    attention runs at.
    """

    group_id: int
    page_table: tuple[int, ...]
    prefix_len: int  # the segment's own tokens
    level: int = 0


@dataclasses.dataclass(slots=True, unsafe_hash=True)
class ChunkWork:
    """Tokens of one sequence computed in one step.

    A sequence is a request (`seq_id >= 0`, its index in the input) or shared segment g
    (`seq_id == prefix_seq_id(g)`), whose own pages are that segment's pages. Token i of the
    chunk has own-part index `own_start + i` and model position `prefix_len + own_start + i`,
    where `prefix_len` is the length of everything the sequence attends before its own part
    (0 if nothing). It attends, causally, to own-part indices `<= own_start + i` in
    `page_table`, and, without a mask, to every segment of `prefix_chain` (top-level first;
    `prefix_group` is its last, the deepest).

    Read-only once made (and hashed by value), like the frozen values here, but not frozen:
    a decode step makes a chunk per running request, and a frozen dataclass is made field by
    field through `object.__setattr__`, several times slower than plain assignments.
    """

    seq_id: int
    token_ids: tuple[int, ...]  # the inputs; a decode chunk is (last sampled token,)
    own_start: int
    page_table: tuple[int, ...]  # own pages, enough for own_start + len(token_ids) tokens
    prefix_group: int | None  # group whose shared prefix this sequence attends
    prefix_len: int  # that prefix's length in tokens (0 when prefix_group is None)
    sample: bool  # sample a token from the last position (last prompt chunk, or decode)
    is_decode: bool = False
    prefix_chain: tuple[int, ...] = ()  # segments attended, top-level first

    def __post_init__(self) -> None:
        if self.prefix_group is not None and not self.prefix_chain:
            self.prefix_chain = (self.prefix_group,)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step's work, in the order the executor lays tokens out."""

    step_index: int
    chunks: tuple[ChunkWork, ...]
    prefixes: tuple[PrefixRef, ...]  # every segment that a chunk in this step attends
    preempted: tuple[int, ...] = ()  # requests sent back to waiting before this step
    kv_pages_in_use: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclasses.dataclass(slots=True, unsafe_hash=True)
class SampledToken:
    """What the executor reports for a chunk that sampled.

    Read-only once made, as `ChunkWork`, and not frozen for the same reason: the executor
    makes two a running request each step (the placeholder, then the real token)."""

    seq_id: int
    token_id: int
    finished: bool  # EOS, stop token/string or max_tokens reached: the request is done


def placeholder_token(row: int) -> int:
    """The stand-in id of a token still being sampled, in sampled row `row` of the step in
    flight: the executor reports it at once (`Batcher.complete`) so the next step can be
    planned while this one runs, and reads the real token from that row on the device. Real
    ids are never negative."""
    return -(row + 1)


def placeholder_row(token_id: int) -> int:
    return -token_id - 1


def prefix_seq_id(group_id: int) -> int:
    """Sequence id of a shared segment's computation (negative, so it never clashes)."""
    return -(group_id + 1)


@dataclasses.dataclass(frozen=True)
class SchedRequest:
    """What the schedule knows of a request: its prompt tokens and its decode limit.

    `logits_from`: the first prompt position whose logits the request needs (prompt
    logprobs, scoring); no shared segment or cached page covers it or anything after, so the
    request computes those tokens itself. None: only its last prompt token's.
    """

    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    decode_estimate: float | None = None  # expected output length; None: use max_tokens
    logits_from: int | None = None

    @property
    def shareable_len(self) -> int:
        """The most prompt tokens it may take from shared segments or cached pages."""
        last = len(self.prompt_token_ids) - 1
        return last if self.logits_from is None else max(0, min(last, self.logits_from))

    @property
    def logits_rows(self) -> int:
        """Logits rows its prompt needs: the scored positions and the last (sampled) one."""
        return len(self.prompt_token_ids) - self.shareable_len
