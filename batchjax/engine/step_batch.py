"""StepBatch: one StepPlan laid out as fixed-size arrays for the jitted step.

Tokens are padded to the step's token bucket; everything else (the ragged attention metadata,
the sampled rows) is sized from that bucket and from the job's page-table width, so the shape
of a step is one of the few `BucketTable.shapes()` (see `batchjax.attention.metadata`).
"""

from __future__ import annotations

import dataclasses
import itertools
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


def _group_contiguous(chunks):
    """Chunks reordered so the chunks below each shared segment are adjacent, at every level:
    by their chains, each segment keyed by where it first appears (stable; the chunks that
    attend nothing sit together, where the first of them was). A segment's own chunk sits with
    its parent's subtree.

    A chain's key is made once, at its first chunk (its segments appear there at the latest),
    and a batcher's chunks of one group carry one chain object: most chunks cost a compare."""
    first: dict[int | None, int] = {}
    key_of: dict[tuple[int, ...], tuple[int, ...]] = {}
    keys = []
    chain = key = None
    for i, c in enumerate(chunks):
        if c.prefix_chain is not chain:
            chain = c.prefix_chain
            key = key_of.get(chain)
            if key is None:
                for s in chain or (None,):
                    first.setdefault(s, i)
                key = key_of[chain] = tuple(first[s] for s in chain or (None,))
        keys.append(key)
    return [chunks[i] for i in sorted(range(len(chunks)), key=keys.__getitem__)]


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

    The layout runs on the host while the device computes the step before, so it is built
    with whole-array operations over the chunks, not chunk by chunk: a decode step of a few
    hundred rows would otherwise spend milliseconds in Python.
    """
    chunks = _group_contiguous(plan.chunks)
    count = len(chunks)
    q_len = np.fromiter((len(c.token_ids) for c in chunks), np.int32, count)  # [C]
    own_start = np.fromiter((c.own_start for c in chunks), np.int32, count)
    prefix_len = np.fromiter((c.prefix_len for c in chunks), np.int32, count)
    sample = np.fromiter((c.sample for c in chunks), bool, count)
    n_tokens = int(q_len.sum())
    scored = [_score_rows(c, score_ranges) for c in chunks] if score_ranges else []
    n_sampled = int(sample.sum())
    n_scored = sum(len(rows) for rows in scored)
    shape = buckets.shape(n_tokens, n_sampled + n_scored)
    t_pad, s_pad, width, levels = (shape.tokens, shape.sampled, shape.table_pages,
                                   shape.prefix_levels)

    # Tokens: [T], each row's chunk and its index in the chunk's own part.
    q_start = np.zeros(count, np.int32)
    np.cumsum(q_len[:-1], out=q_start[1:])
    chunk_of = np.repeat(np.arange(count, dtype=np.int32), q_len)
    own_idx = np.arange(n_tokens, dtype=np.int32) - q_start[chunk_of] + own_start[chunk_of]
    token_ids = np.zeros(t_pad, np.int32)
    token_ids[:n_tokens] = np.fromiter(
        itertools.chain.from_iterable(c.token_ids for c in chunks), np.int32, n_tokens)
    positions = np.zeros(t_pad, np.int32)
    positions[:n_tokens] = prefix_len[chunk_of] + own_idx

    # Own pages: each sequence's table up to its last token, and the slot each token writes.
    reached = -(-(own_start + q_len) // page_size)  # [C] pages up to the chunk's last token
    _check_widths(reached, width, lambda i: f"sequence {chunks[i].seq_id}")
    seq_tables = np.full((t_pad, width), NULL_PAGE, np.int32)
    pages = np.fromiter(itertools.chain.from_iterable(
        c.page_table[:k] for c, k in zip(chunks, reached.tolist())), np.int32, int(reached.sum()))
    table_row = np.repeat(np.arange(count), reached)
    table_start = np.zeros(count, np.int64)
    np.cumsum(reached[:-1], out=table_start[1:])
    seq_tables[table_row, np.arange(pages.size) - table_start[table_row]] = pages
    slot_mapping = np.full(t_pad, NULL_PAGE * page_size, np.int32)
    slot_mapping[:n_tokens] = (pages[table_start[chunk_of] + own_idx // page_size] * page_size
                               + own_idx % page_size)
    seq_kv, seq_start, seq_len = (np.zeros(t_pad, np.int32) for _ in range(3))
    seq_kv[:count], seq_start[:count], seq_len[:count] = own_start + q_len, q_start, q_len

    group_tables = np.full((levels, t_pad, width), NULL_PAGE, np.int32)
    group_len, group_start, group_q = (np.zeros((levels, t_pad), np.int32) for _ in range(3))
    _lay_out_segments(plan, chunks, q_len, q_start, levels, group_tables, group_len,
                      group_start, group_q)

    # Sampled rows (a chunk's last token), then scoring rows.
    logits_index = np.zeros(s_pad, np.int32)
    sample_positions = np.zeros(s_pad, np.int32)
    logits_index[:n_sampled] = (q_start + q_len - 1)[sample]
    sample_positions[:n_sampled] = (prefix_len + own_start + q_len)[sample]
    sample_seqs = tuple(c.seq_id for c, s in zip(chunks, sample.tolist()) if s)
    score_seqs, score_positions = [], []
    at = n_sampled
    for c, r0, rows in zip(chunks, q_start.tolist(), scored):
        for i in rows:
            logits_index[at] = r0 + i
            at += 1
            score_seqs.append(c.seq_id)
            score_positions.append(c.prefix_len + c.own_start + i)

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
        sample_seq_ids=sample_seqs,
        sample_positions=sample_positions,
        metadata=md,
        num_tokens=n_tokens,
        shape=shape,
        score_seq_ids=tuple(score_seqs),
        score_positions=tuple(score_positions),
    )


def _check_widths(pages: np.ndarray, width: int, what) -> None:
    if pages.size and int(pages.max()) > width:
        i = int(np.argmax(pages))
        raise ValueError(f"{what(i)} needs {int(pages[i])} pages; the step's page tables hold "
                         f"{width} (BucketTable.table_pages)")


def _lay_out_segments(plan: StepPlan, chunks, q_len, q_start, levels: int, group_tables,
                      group_len, group_start, group_q) -> None:
    """The prefix part: at each level, every segment with the rows of the chunks below it.

    The chunks below a segment are adjacent (`_group_contiguous`), so at each level a segment
    is one run of equal segment ids over the chunks. Adjacent chunks with the same chain (a
    group's) share every level's segment, so the levels are read over runs of equal chains,
    a few per step, not over the chunks."""
    chains = [c.prefix_chain for c in chunks]
    depth = max(map(len, chains), default=0)
    if depth > levels:
        c = next(c for c in chunks if len(c.prefix_chain) == depth)
        raise ValueError(f"sequence {c.seq_id} attends {depth} shared segments; the step "
                         f"holds {levels} (BucketTable.prefix_levels)")
    if not depth:
        return
    run_first, run_chains = [], []  # [R] each run's first chunk, and its chain
    for i, chain in enumerate(chains):
        if not run_chains or chain != run_chains[-1]:
            run_first.append(i)
            run_chains.append(chain)
    run_last = np.array(run_first[1:] + [len(chains)]) - 1  # [R] each run's last chunk
    run_first = np.array(run_first)
    prefixes = {p.group_id: p for p in plan.prefixes}
    for level in range(depth):
        seg = np.array([chain[level] if len(chain) > level else -1 for chain in run_chains],
                       np.int64)  # [R], -1: none
        first = np.flatnonzero(np.diff(seg, prepend=-2) != 0)  # each segment's first run
        first = first[seg[first] >= 0]
        ids = seg[first]
        if len(set(ids.tolist())) != len(ids):
            raise AssertionError(f"a segment's rows are not contiguous at level {level}")
        last = np.flatnonzero(np.diff(seg, append=-2) != 0)  # each segment's last run
        last = last[seg[last] >= 0]
        c0, c1 = run_first[first], run_last[last]  # the segment's first and last chunk
        g = len(ids)
        group_start[level, :g] = q_start[c0]
        group_q[level, :g] = q_start[c1] + q_len[c1] - q_start[c0]
        refs = [prefixes[s] for s in ids.tolist()]
        group_len[level, :g] = [p.prefix_len for p in refs]
        _check_widths(np.array([len(p.page_table) for p in refs]), group_tables.shape[2],
                      lambda i: f"segment {refs[i].group_id}")
        for row, p in enumerate(refs):
            group_tables[level, row, : len(p.page_table)] = p.page_table


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
