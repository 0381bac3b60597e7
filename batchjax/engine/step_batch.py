"""StepBatch: one StepPlan laid out as padded, static-shape arrays for the jitted step."""

from __future__ import annotations

import dataclasses

import numpy as np

from batchjax.attention.metadata import (
    CONTEXT_BLOCKS,
    PREFIX_LARGE_BLOCK,
    PagedAttentionMetadata,
    split_prefix_queries,
    window_tile_rows,
)
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.step_plan import NULL_PAGE, StepPlan


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Host arrays of one step; `shape_key` names the compiled program it needs."""

    token_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    logits_index: np.ndarray  # [Ss] int32 rows whose next token is sampled (padding: 0)
    sample_seq_ids: tuple[int, ...]  # the sequence of each real sampled row, in order
    sample_positions: np.ndarray  # [Ss] int32 position of the token being sampled
    metadata: PagedAttentionMetadata  # numpy leaves
    num_tokens: int  # real (unpadded) tokens

    @property
    def shape_key(self) -> tuple:
        arrays = [self.token_ids, self.logits_index] + [
            getattr(self.metadata, f.name) for f in dataclasses.fields(self.metadata)]
        return tuple(a.shape for a in arrays if a is not None)


def _pad_table(tables: list[tuple[int, ...]], width: int, rows: int) -> np.ndarray:
    out = np.full((rows, width), NULL_PAGE, np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def _reached_pages(chunk, page_size: int) -> tuple[int, ...]:
    """The chunk's own pages up to its last token: a sequence may hold pages for tokens still
    to come, and every page in a table is gathered and attended to (then masked)."""
    return chunk.page_table[: -(-(chunk.own_start + chunk.num_tokens) // page_size)]


def _group_contiguous(chunks):
    """Chunks reordered so each group's chunks are adjacent (stable, by first appearance)."""
    first: dict[int | None, int] = {}
    for i, c in enumerate(chunks):
        first.setdefault(c.prefix_group, i)
    return sorted(chunks, key=lambda c: first[c.prefix_group])


def build_step_batch(plan: StepPlan, page_size: int, buckets: BucketTable,
                     ragged: bool = False) -> StepBatch:
    """Lay out the plan's chunks and derive the attention metadata.

    With `ragged`, chunks are laid out group by group and the metadata also carries the ragged
    form the Pallas kernels read.
    """
    chunks = _group_contiguous(plan.chunks) if ragged else plan.chunks
    n_tokens = plan.num_tokens
    t_pad = buckets.tokens_bucket(n_tokens)
    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slot_mapping = np.full(t_pad, NULL_PAGE * page_size, np.int32)

    rows_tok, rows_tab, rows_len = [], [], []
    blk_tok, blk_tab, blk_ctx = [], [], []
    tok_chunk = np.full(t_pad, -1, np.int32)
    tile = window_tile_rows(t_pad)
    window = 0  # rows a query tile must reach back to see its chunk's first key
    num_multi = 0  # multi-token chunks
    group_rows: dict[int, list[int]] = {}
    sample_rows, sample_seqs, sample_pos = [], [], []
    # Single-query rows and context blocks are padded to their own widths: in a step that
    # mixes decode rows (a few own pages each) with a long prefill chunk, a shared width made
    # every row read the chunk's whole table.
    row_pages_max = ctx_pages_max = 1
    longest_ctx_chunk = max((c.num_tokens for c in chunks if c.num_tokens > 1 and c.own_start > 0),
                            default=0)
    ctx_block = next((w for w in CONTEXT_BLOCKS if w >= longest_ctx_chunk), CONTEXT_BLOCKS[-1])

    r0 = 0
    for i, c in enumerate(chunks):
        n = c.num_tokens
        own_idx = c.own_start + np.arange(n)
        token_ids[r0 : r0 + n] = c.token_ids
        positions[r0 : r0 + n] = c.prefix_len + own_idx
        own_table = _reached_pages(c, page_size)
        table = np.asarray(own_table, np.int32)
        slot_mapping[r0 : r0 + n] = table[own_idx // page_size] * page_size + own_idx % page_size
        if n == 1:
            row_pages_max = max(row_pages_max, len(own_table))
            rows_tok.append(r0)
            rows_tab.append(own_table)
            rows_len.append(c.own_start + 1)
        else:
            # This step's keys of the chunk, causally, in windows of the step's rows ...
            tok_chunk[r0 : r0 + n] = i
            num_multi += 1
            window = max(window, ((r0 + n - 1) // tile + 1) * tile - r0)
            if c.own_start > 0:
                # ... and the keys the sequence held before, all visible, in blocks.
                ctx_table = own_table[: -(-c.own_start // page_size)]
                ctx_pages_max = max(ctx_pages_max, len(ctx_table))
                for b in range(0, n, ctx_block):
                    m = min(ctx_block, n - b)
                    tok = np.full(ctx_block, t_pad, np.int32)
                    tok[:m] = r0 + b + np.arange(m)
                    blk_tok.append(tok)
                    blk_tab.append(ctx_table)
                    blk_ctx.append(c.own_start)
        if c.prefix_group is not None and c.prefix_len > 0:
            group_rows.setdefault(c.prefix_group, []).extend(range(r0, r0 + n))
        if c.sample:
            sample_rows.append(r0 + n - 1)
            sample_seqs.append(c.seq_id)
            sample_pos.append(c.prefix_len + c.own_start + n)
        r0 += n
    if window:
        window = buckets.window_bucket(window, t_pad)
        ends = np.arange(1, t_pad // tile + 1, dtype=np.int32)[:, None] * tile
        win_key_row = ends - window + np.arange(window, dtype=np.int32)[None, :]
        win_key_row[win_key_row < 0] = t_pad
    else:
        win_key_row = np.zeros((0, 0), np.int32)

    prefixes = {p.group_id: p for p in plan.prefixes}
    small_q, split = split_prefix_queries([len(rows) for rows in group_rows.values()],
                                          buckets.blocks_bucket)
    blocks = {small_q: ([], [], []), PREFIX_LARGE_BLOCK: ([], [], [])}  # token, table, len
    for (g, rows), (n_large, n_small) in zip(group_rows.items(), split):
        pref = prefixes[g]
        sizes = [PREFIX_LARGE_BLOCK] * n_large + [small_q] * n_small
        b = 0
        for q in sizes:
            part = rows[b : b + q]
            b += q
            tok = np.full(q, t_pad, np.int32)
            tok[: len(part)] = part
            toks, tabs, lens = blocks[q]
            toks.append(tok)
            tabs.append(pref.page_table)
            lens.append(pref.prefix_len)
    gblk_tok, gblk_tab, gblk_len = blocks[small_q]
    lblk_tok, lblk_tab, lblk_len = blocks[PREFIX_LARGE_BLOCK]

    rp_pad = buckets.pages_bucket(row_pages_max)
    bp_pad = buckets.context_pages_bucket(ctx_pages_max)
    pg_pad = buckets.pages_bucket(max([len(t) for t in gblk_tab + lblk_tab], default=1))
    r_pad = buckets.rows_bucket(len(rows_tok))
    b_pad = buckets.blocks_bucket(len(blk_tok))
    g_pad = buckets.blocks_bucket(len(gblk_tok))
    l_pad = buckets.blocks_bucket(len(lblk_tok))
    # A sampling chunk is a row or a multi-token chunk. Room for one chunk per query tile
    # costs a few lm_head rows (8 in a 512-row step) but no shape dimension of its own.
    tiles = t_pad // tile
    s_pad = r_pad + (0 if num_multi == 0 else max(tiles, buckets.blocks_bucket(num_multi)))

    def rows_of(vals, fill, rows, dtype=np.int32, width=None):
        shape = (rows,) if width is None else (rows, width)
        out = np.full(shape, fill, dtype)
        if vals:
            out[: len(vals)] = np.asarray(vals, dtype)
        return out

    ragged_fields = {}
    if ragged:
        ragged_fields = _ragged_metadata(chunks, prefixes, buckets, page_size, pg_pad)
    md = PagedAttentionMetadata(
        slot_mapping=slot_mapping,
        row_token=rows_of(rows_tok, t_pad, r_pad),
        row_page_table=_pad_table(rows_tab, rp_pad, r_pad),
        row_kv_len=rows_of(rows_len, 0, r_pad),
        tok_chunk=tok_chunk,
        win_key_row=win_key_row,
        blk_token=rows_of(blk_tok, t_pad, b_pad, width=ctx_block),
        blk_page_table=_pad_table(blk_tab, bp_pad, b_pad),
        blk_ctx_len=rows_of(blk_ctx, 0, b_pad),
        gblk_token=rows_of(gblk_tok, t_pad, g_pad, width=small_q),
        gblk_page_table=_pad_table(gblk_tab, pg_pad, g_pad),
        gblk_prefix_len=rows_of(gblk_len, 0, g_pad),
        lblk_token=rows_of(lblk_tok, t_pad, l_pad, width=PREFIX_LARGE_BLOCK),
        lblk_page_table=_pad_table(lblk_tab, pg_pad, l_pad),
        lblk_prefix_len=rows_of(lblk_len, 0, l_pad),
        **ragged_fields,
    )
    return StepBatch(
        token_ids=token_ids,
        positions=positions,
        logits_index=rows_of(sample_rows, 0, s_pad),
        sample_seq_ids=tuple(sample_seqs),
        sample_positions=rows_of(sample_pos, 0, s_pad),
        metadata=md,
        num_tokens=n_tokens,
    )


def _ragged_metadata(chunks, prefixes, buckets: BucketTable, page_size: int,
                     pg_pad: int) -> dict:
    """`seq_*` / `group_*` arrays: one sequence per chunk, groups in layout order."""
    s_pad = buckets.rows_bucket(len(chunks))
    seq_tables, seq_kv, seq_start, seq_len = [], [], [], []
    groups: dict[int, list[int]] = {}  # group -> [q_start, q_len]
    r0 = 0
    for c in chunks:
        seq_tables.append(_reached_pages(c, page_size))
        seq_kv.append(c.own_start + c.num_tokens)
        seq_start.append(r0)
        seq_len.append(c.num_tokens)
        if c.prefix_group is not None and c.prefix_len > 0:
            span = groups.setdefault(c.prefix_group, [r0, 0])
            span[1] += c.num_tokens
        r0 += c.num_tokens
    g_pad = buckets.rows_bucket(max(len(groups), 1))
    p_pad = buckets.pages_bucket(max(len(t) for t in seq_tables))

    def col(vals, rows):
        out = np.zeros(rows, np.int32)
        out[: len(vals)] = vals
        return out

    return dict(
        seq_page_tables=_pad_table(seq_tables, p_pad, s_pad),
        seq_kv_lens=col(seq_kv, s_pad),
        seq_q_start=col(seq_start, s_pad),
        seq_q_len=col(seq_len, s_pad),
        group_page_tables=_pad_table([prefixes[g].page_table for g in groups], pg_pad, g_pad),
        group_prefix_lens=col([prefixes[g].prefix_len for g in groups], g_pad),
        group_q_start=col([span[0] for span in groups.values()], g_pad),
        group_q_len=col([span[1] for span in groups.values()], g_pad),
    )
