"""StepBatch: one StepPlan laid out as fixed-size arrays for the jitted step.

Tokens are padded to the step's token bucket; everything else (the ragged attention metadata,
the sampled rows) is sized from that bucket and from the job's page-table width, so the shape
of a step is one of the few `BucketTable.shapes()` (see `batchjax.attention.metadata`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from batchjax.attention.metadata import PagedAttentionMetadata
from batchjax.schedule.buckets import BucketTable, StepShape
from batchjax.schedule.step_plan import NULL_PAGE, StepPlan


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Host arrays of one step; `shape` names the compiled program it needs."""

    token_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    # [Ss] int32 token rows whose logits are computed: first the sampled rows, then the
    # scoring rows (prompt logprobs), then padding (0).
    logits_index: np.ndarray
    sample_seq_ids: tuple[int, ...]  # the sequence of each real sampled row, in order
    sample_positions: np.ndarray  # [Ss] int32 position of the token being sampled
    metadata: PagedAttentionMetadata  # numpy leaves
    num_tokens: int  # real (unpadded) tokens
    shape: StepShape
    # Scoring rows, after the sampled ones: the sequence of each and the model position of
    # its token (its logits score the prompt token at the next position).
    score_seq_ids: tuple[int, ...] = ()
    score_positions: tuple[int, ...] = ()

    @property
    def num_logits_rows(self) -> int:
        return len(self.sample_seq_ids) + len(self.score_seq_ids)


def _reached_pages(chunk, page_size: int) -> tuple[int, ...]:
    """The chunk's own pages up to its last token: a sequence may hold pages for tokens still
    to come, and a table need not name them."""
    return chunk.page_table[: -(-(chunk.own_start + chunk.num_tokens) // page_size)]


def _group_contiguous(chunks):
    """Chunks reordered so the chunks below each shared segment are adjacent, at every level:
    by their chains, each segment keyed by where it first appears (stable; the chunks that
    attend nothing sit together, where the first of them was). A segment's own chunk sits with
    its parent's subtree."""
    first: dict[int | None, int] = {}
    for i, c in enumerate(chunks):
        for s in c.prefix_chain or (None,):
            first.setdefault(s, i)
    return sorted(chunks, key=lambda c: tuple(first[s] for s in c.prefix_chain or (None,)))


def _put_table(out: np.ndarray, row: int, table, what: str) -> None:
    if len(table) > out.shape[1]:
        raise ValueError(f"{what} needs {len(table)} pages; the step's page tables hold "
                         f"{out.shape[1]} (BucketTable.table_pages)")
    out[row, : len(table)] = table


def _score_rows(chunk, ranges) -> range:
    """Own-part rows of `chunk` (0-based in the chunk) whose logits score a prompt token: its
    tokens at model positions in the sequence's range [lo, hi) of `ranges`, if any."""
    span = ranges.get(chunk.seq_id) if ranges and not chunk.is_decode else None
    if span is None:
        return range(0)
    first = chunk.prefix_len + chunk.own_start
    lo, hi = max(span[0], first), min(span[1], first + chunk.num_tokens)
    return range(lo - first, max(lo, hi) - first)


def build_step_batch(plan: StepPlan, page_size: int, buckets: BucketTable,
                     score_ranges: Mapping[int, tuple[int, int]] | None = None) -> StepBatch:
    """Lay out the plan's chunks, group by group, and derive the ragged attention metadata.

    `score_ranges`: per request wanting prompt logprobs, the model positions [lo, hi) whose
    logits it needs (a row predicts the token after it); those of its tokens this step
    computes become scoring rows. Shared segments never cover them (`SchedRequest.logits_from`).
    """
    chunks = _group_contiguous(plan.chunks)
    n_tokens = plan.num_tokens
    n_sampled = sum(1 for c in chunks if c.sample)
    n_scored = sum(len(_score_rows(c, score_ranges)) for c in chunks)
    shape = buckets.shape(n_tokens, n_sampled + n_scored)
    t_pad, s_pad, width = shape.tokens, shape.sampled, shape.table_pages
    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slot_mapping = np.full(t_pad, NULL_PAGE * page_size, np.int32)
    # Sequences and segments: at most one per token (per level), padded with q_len 0.
    levels = shape.prefix_levels
    seq_tables = np.full((t_pad, width), NULL_PAGE, np.int32)
    seq_kv, seq_start, seq_len = (np.zeros(t_pad, np.int32) for _ in range(3))
    group_tables = np.full((levels, t_pad, width), NULL_PAGE, np.int32)
    group_len, group_start, group_q = (np.zeros((levels, t_pad), np.int32) for _ in range(3))
    logits_index = np.zeros(s_pad, np.int32)
    sample_positions = np.zeros(s_pad, np.int32)
    sample_seqs = []
    score_rows: list[int] = []
    score_seqs: list[int] = []
    score_positions: list[int] = []
    prefixes = {p.group_id: p for p in plan.prefixes}
    group_row: list[dict[int, int]] = [{} for _ in range(levels)]

    r0 = 0
    for i, c in enumerate(chunks):
        n = c.num_tokens
        own_idx = c.own_start + np.arange(n)
        token_ids[r0 : r0 + n] = c.token_ids
        positions[r0 : r0 + n] = c.prefix_len + own_idx
        table = np.asarray(_reached_pages(c, page_size), np.int32)
        slot_mapping[r0 : r0 + n] = table[own_idx // page_size] * page_size + own_idx % page_size
        _put_table(seq_tables, i, table, f"sequence {c.seq_id}")
        seq_kv[i], seq_start[i], seq_len[i] = c.own_start + n, r0, n
        if len(c.prefix_chain) > levels:
            raise ValueError(f"sequence {c.seq_id} attends {len(c.prefix_chain)} shared "
                             f"segments; the step holds {levels} (BucketTable.prefix_levels)")
        for level, seg in enumerate(c.prefix_chain):
            rows = group_row[level]
            g = rows.get(seg)
            if g is None:
                g = rows[seg] = len(rows)
                pref = prefixes[seg]
                _put_table(group_tables[level], g, pref.page_table, f"segment {seg}")
                group_len[level, g], group_start[level, g] = pref.prefix_len, r0
            elif group_start[level, g] + group_q[level, g] != r0:
                raise AssertionError(f"segment {seg}'s rows are not contiguous")
            group_q[level, g] += n
        if c.sample:
            k = len(sample_seqs)
            logits_index[k] = r0 + n - 1
            sample_positions[k] = c.prefix_len + c.own_start + n
            sample_seqs.append(c.seq_id)
        for i in _score_rows(c, score_ranges):
            score_rows.append(r0 + i)
            score_seqs.append(c.seq_id)
            score_positions.append(c.prefix_len + c.own_start + i)
        r0 += n
    logits_index[n_sampled : n_sampled + n_scored] = score_rows

    md = PagedAttentionMetadata(
        slot_mapping=slot_mapping,
        seq_page_tables=seq_tables,
        seq_kv_lens=seq_kv,
        seq_q_start=seq_start,
        seq_q_len=seq_len,
        group_page_tables=group_tables,
        group_prefix_lens=group_len,
        group_q_start=group_start,
        group_q_len=group_q,
    )
    return StepBatch(
        token_ids=token_ids,
        positions=positions,
        logits_index=logits_index,
        sample_seq_ids=tuple(sample_seqs),
        sample_positions=sample_positions,
        metadata=md,
        num_tokens=n_tokens,
        shape=shape,
        score_seq_ids=tuple(score_seqs),
        score_positions=tuple(score_positions),
    )


def empty_step_batch(shape: StepShape) -> StepBatch:
    """A step of `shape` with no work in it (every row padding): what warm-up compiles on."""
    t, width, levels = shape.tokens, shape.table_pages, shape.prefix_levels
    zeros = lambda *dims: np.zeros(dims, np.int32)  # noqa: E731
    md = PagedAttentionMetadata(
        slot_mapping=np.full(t, NULL_PAGE, np.int32),
        seq_page_tables=zeros(t, width), seq_kv_lens=zeros(t), seq_q_start=zeros(t),
        seq_q_len=zeros(t), group_page_tables=zeros(levels, t, width),
        group_prefix_lens=zeros(levels, t), group_q_start=zeros(levels, t),
        group_q_len=zeros(levels, t))
    return StepBatch(token_ids=zeros(t), positions=zeros(t), logits_index=zeros(shape.sampled),
                     sample_seq_ids=(), sample_positions=zeros(shape.sampled), metadata=md,
                     num_tokens=0, shape=shape)
