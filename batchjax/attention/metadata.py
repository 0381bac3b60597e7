"""Per-step attention metadata, built on the host by the engine and closed over by attention.

The step's tokens are laid out flat (`T` rows). Attention has two parts (DESIGN.md):
- own part: every token attends causally to its own sequence's keys. Single-token chunks
  (decode, one-token suffixes) are *rows*, one query each, reading their own pages. A longer
  chunk's queries attend to the chunk's keys of this step straight from the step's rows: the
  step is cut into query tiles, each reading the window of rows its chunks reach back to
  (`chunk_window_attention`), so a chunk costs about its length squared instead of every
  query reading the chunk's whole page table. A chunk that continues its sequence adds
  *context blocks* of 64 or 128 queries against the pages its sequence held before.
- prefix part: the tokens of a group are cut into blocks, each attending without a mask to
  the group's whole shared prefix: one dense `[Q x prefix_len]` product per block instead of
  a matrix-vector product per query. Each block gathers the prefix's keys afresh, so there
  are two kinds (`split_prefix_queries`): large blocks of `PREFIX_LARGE_BLOCK` queries gather
  a prefix once for a long run of suffix tokens, small ones (4 or 16 queries, chosen per
  step) take a group's few decode tokens without padding them to a large block.
Index padding points at row `T` (one past the end), which gathers clamp and scatters drop.

The Pallas kernels read the same step in ragged form instead (`seq_*`, `group_*`: the tokens of
a sequence, and the sequences of a group, are contiguous); the engine fills those fields only
for `--attention=pallas`, so the XLA path's programs do not depend on them.
"""

from __future__ import annotations

import dataclasses

import jax

# Queries per own-context block: the earlier keys of a chunk that continues its sequence. A
# step takes the narrowest width its longest such chunk fits, or the widest (a chunk of 64
# tokens in a block of 128 computed as many padding queries as real ones).
CONTEXT_BLOCKS = (64, 128)
PREFIX_SMALL_BLOCKS = (4, 16)  # queries per small prefix-part block, one size per step
PREFIX_LARGE_BLOCK = 64  # queries per large prefix-part block
# Estimated work of one prefix block per prefix key, in units of one query's products in a
# 16-query block: the gather of the key (K and V into the block's copy) plus each query's
# products, which run less efficiently in small blocks. Fitted to XLA on CPU with decode and
# suffix-prefill steps of a 1,024-token prefix (4 x 16, 16 x 4 and 64 x 4 decode; 8 x 64
# suffix tokens), each timed with every block size.
PREFIX_GATHER_COST = 6.5
PREFIX_QUERY_COST = {4: 2.2, 16: 1.0, 64: 0.8}


def _block_cost(q: int) -> float:
    return PREFIX_GATHER_COST + q * PREFIX_QUERY_COST[q]


def window_tile_rows(num_rows: int) -> int:
    """Rows per query tile of `chunk_window_attention` in a step of `num_rows` (padded) rows:
    the largest power of two up to 64 that divides it."""
    tile = 64
    while num_rows % tile:
        tile //= 2
    return tile


def split_prefix_queries(
    queries_per_group: list[int], pad_blocks=lambda n: n
) -> tuple[int, list[tuple[int, int]]]:
    """How the prefix part cuts each group's queries into large and small blocks.

    Returns the step's small block size (from `PREFIX_SMALL_BLOCKS`) and, per group, its
    number of large and of small blocks: whole `PREFIX_LARGE_BLOCK`s first, the rest in small
    blocks unless one more large block costs less. `pad_blocks` rounds each kind's block count
    up to its bucket (padding blocks cost as much as real ones); the small size with the least
    estimated work wins, ties going to the larger. Prefix lengths are left out: they scale
    every choice's cost of a group alike.
    """
    large_cost = _block_cost(PREFIX_LARGE_BLOCK)
    best = None
    for small_q in reversed(PREFIX_SMALL_BLOCKS):
        split = []
        for n in queries_per_group:
            large, rest = divmod(n, PREFIX_LARGE_BLOCK)
            small = -(-rest // small_q)
            if small * _block_cost(small_q) > large_cost:
                large, small = large + 1, 0
            split.append((large, small))
        cost = (pad_blocks(sum(g[0] for g in split)) * large_cost
                + pad_blocks(sum(g[1] for g in split)) * _block_cost(small_q))
        if best is None or cost < best[0]:
            best = (cost, small_q, split)
    return best[1], best[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttentionMetadata:
    slot_mapping: jax.Array  # [T] flat KV slot (page * page_size + offset) each token writes
    # own part, single-query rows
    row_token: jax.Array  # [R] token row, T = padding
    row_page_table: jax.Array  # [R, P] own pages of the row's sequence
    row_kv_len: jax.Array  # [R] own keys visible to the row (its own index + 1)
    # own part of multi-token chunks, this step's keys: query tiles of T / Tt rows, each
    # reading a window of W rows (`chunk_window_attention`)
    tok_chunk: jax.Array  # [T] the chunk of each row (-1: a single-query row or padding)
    win_key_row: jax.Array  # [Tt, W] rows tile i reads, in row order, T = none ([0, 0]: none)
    # own part of multi-token chunks, the keys their sequence held before this step: blocks of
    # queries (a width from CONTEXT_BLOCKS, one per step) of one sequence against its earlier
    # own pages
    blk_token: jax.Array  # [B, one of CONTEXT_BLOCKS] token rows, T = padding
    blk_page_table: jax.Array  # [B, P] own pages up to the chunk's first key
    blk_ctx_len: jax.Array  # [B] own keys before the chunk, all visible (0: padding)
    # prefix part, small blocks of Q queries of one group (Q from `split_prefix_queries`)
    gblk_token: jax.Array  # [Bg, Q] token rows, T = padding
    gblk_page_table: jax.Array  # [Bg, Pg] the group's shared prefix pages
    gblk_prefix_len: jax.Array  # [Bg] prefix length in tokens (0 for padding blocks)
    # prefix part, large blocks of PREFIX_LARGE_BLOCK queries of one group
    lblk_token: jax.Array  # [Bl, PREFIX_LARGE_BLOCK]
    lblk_page_table: jax.Array  # [Bl, Pg]
    lblk_prefix_len: jax.Array  # [Bl]
    # ragged form for the Pallas kernels (None on the XLA path)
    seq_page_tables: jax.Array | None = None  # [S, P] own pages of each sequence
    seq_kv_lens: jax.Array | None = None  # [S] own keys after this step's writes
    seq_q_start: jax.Array | None = None  # [S] first token row of the sequence
    seq_q_len: jax.Array | None = None  # [S] its tokens this step (0: padding)
    group_page_tables: jax.Array | None = None  # [G, Pg] shared prefix pages
    group_prefix_lens: jax.Array | None = None  # [G]
    group_q_start: jax.Array | None = None  # [G] first token row of the group's queries
    group_q_len: jax.Array | None = None  # [G] (0: padding)
