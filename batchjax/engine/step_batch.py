"""StepBatch: one StepPlan laid out as padded, static-shape arrays for the jitted step."""

from __future__ import annotations

import dataclasses

import numpy as np

from batchjax.attention.metadata import BLOCK_Q, PagedAttentionMetadata
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
    def shape_key(self) -> tuple[int, ...]:
        md = self.metadata
        return (
            self.token_ids.shape[0],
            md.row_token.shape[0],
            md.blk_token.shape[0],
            md.gblk_token.shape[0],
            md.row_page_table.shape[1],
            md.gblk_page_table.shape[1],
            self.logits_index.shape[0],
        )


def _pad_table(tables: list[tuple[int, ...]], width: int, rows: int) -> np.ndarray:
    out = np.full((rows, width), NULL_PAGE, np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def build_step_batch(plan: StepPlan, page_size: int, buckets: BucketTable) -> StepBatch:
    """Lay out the plan's chunks in order and derive the attention metadata."""
    n_tokens = plan.num_tokens
    t_pad = buckets.tokens_bucket(n_tokens)
    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slot_mapping = np.full(t_pad, NULL_PAGE * page_size, np.int32)

    rows_tok, rows_tab, rows_len = [], [], []
    blk_tok, blk_tab, blk_qpos = [], [], []
    group_rows: dict[int, list[int]] = {}
    sample_rows, sample_seqs, sample_pos = [], [], []
    own_pages_max = 1

    r0 = 0
    for c in plan.chunks:
        n = c.num_tokens
        own_idx = c.own_start + np.arange(n)
        token_ids[r0 : r0 + n] = c.token_ids
        positions[r0 : r0 + n] = c.prefix_len + own_idx
        table = np.asarray(c.page_table, np.int32)
        slot_mapping[r0 : r0 + n] = table[own_idx // page_size] * page_size + own_idx % page_size
        own_pages_max = max(own_pages_max, len(c.page_table))
        if n == 1:
            rows_tok.append(r0)
            rows_tab.append(c.page_table)
            rows_len.append(c.own_start + 1)
        else:
            for b in range(0, n, BLOCK_Q):
                m = min(BLOCK_Q, n - b)
                tok = np.full(BLOCK_Q, t_pad, np.int32)
                tok[:m] = r0 + b + np.arange(m)
                qpos = np.full(BLOCK_Q, -1, np.int32)
                qpos[:m] = c.own_start + b + np.arange(m)
                blk_tok.append(tok)
                blk_qpos.append(qpos)
                blk_tab.append(c.page_table)
        if c.prefix_group is not None and c.prefix_len > 0:
            group_rows.setdefault(c.prefix_group, []).extend(range(r0, r0 + n))
        if c.sample:
            sample_rows.append(r0 + n - 1)
            sample_seqs.append(c.seq_id)
            sample_pos.append(c.prefix_len + c.own_start + n)
        r0 += n

    prefixes = {p.group_id: p for p in plan.prefixes}
    gblk_tok, gblk_tab, gblk_len = [], [], []
    for g, rows in group_rows.items():
        pref = prefixes[g]
        for b in range(0, len(rows), BLOCK_Q):
            part = rows[b : b + BLOCK_Q]
            tok = np.full(BLOCK_Q, t_pad, np.int32)
            tok[: len(part)] = part
            gblk_tok.append(tok)
            gblk_tab.append(pref.page_table)
            gblk_len.append(pref.prefix_len)

    p_pad = buckets.pages_bucket(own_pages_max)
    pg_pad = buckets.pages_bucket(max([len(t) for t in gblk_tab], default=1))
    r_pad = buckets.rows_bucket(max(len(rows_tok), 1))
    b_pad = buckets.blocks_bucket(max(len(blk_tok), 1))
    g_pad = buckets.blocks_bucket(max(len(gblk_tok), 1))
    s_pad = buckets.rows_bucket(max(len(sample_rows), 1))

    def rows_of(vals, fill, rows, dtype=np.int32, width=None):
        shape = (rows,) if width is None else (rows, width)
        out = np.full(shape, fill, dtype)
        if vals:
            out[: len(vals)] = np.asarray(vals, dtype)
        return out

    md = PagedAttentionMetadata(
        slot_mapping=slot_mapping,
        row_token=rows_of(rows_tok, t_pad, r_pad),
        row_page_table=_pad_table(rows_tab, p_pad, r_pad),
        row_kv_len=rows_of(rows_len, 0, r_pad),
        blk_token=rows_of(blk_tok, t_pad, b_pad, width=BLOCK_Q),
        blk_page_table=_pad_table(blk_tab, p_pad, b_pad),
        blk_qpos=rows_of(blk_qpos, -1, b_pad, width=BLOCK_Q),
        gblk_token=rows_of(gblk_tok, t_pad, g_pad, width=BLOCK_Q),
        gblk_page_table=_pad_table(gblk_tab, pg_pad, g_pad),
        gblk_prefix_len=rows_of(gblk_len, 0, g_pad),
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
