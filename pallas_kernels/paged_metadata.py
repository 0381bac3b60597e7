"""Per-query-block work lists shared by the paged attention kernels (plain jnp).

Both kernels walk the flat token batch in blocks of `block_q` rows. A block needs to know which
sequences (or groups) own some of its rows; because the rows of one sequence are contiguous and
no two sequences share a row, sorting the sequences by their first row makes those a contiguous
range `[block_first[b], block_end[b])` of the sorted order.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BlockWork(NamedTuple):
    """Sequences sorted by first row, and each query block's range in that order."""

    block_first: jax.Array  # [num_blocks] int32, first sorted sequence touching the block
    block_end: jax.Array  # [num_blocks] int32, one past the last
    page_tables: jax.Array  # [S * P] int32, sorted rows flattened (SMEM wants 1-D)
    kv_lens: jax.Array  # [S] int32
    q_starts: jax.Array  # [S] int32
    q_lens: jax.Array  # [S] int32


def block_work(
    num_blocks: int,
    block_q: int,
    num_pages: int,
    page_tables: jax.Array,
    kv_lens: jax.Array,
    q_starts: jax.Array,
    q_lens: jax.Array,
) -> BlockWork:
    """page_tables: [S, P]; kv_lens, q_starts, q_lens: [S]. Sequences with no rows drop out."""
    empty = q_lens <= 0
    big = jnp.iinfo(jnp.int32).max
    order = jnp.argsort(jnp.where(empty, big, q_starts), stable=True)
    starts = jnp.where(empty, big, q_starts)[order]
    ends = jnp.where(empty, big, q_starts + q_lens)[order]  # sorted too: ranges are disjoint
    block_lo = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    # compare_all: one fused comparison. The default binary search is a while loop, and on a
    # GPU each of its iterations waits on the host (about 400 us for a decode step's lists).
    first = jnp.searchsorted(ends, block_lo, side="right", method="compare_all").astype(jnp.int32)
    end = jnp.searchsorted(starts, block_lo + block_q, side="left", method="compare_all")
    end = end.astype(jnp.int32)
    tables = jnp.clip(page_tables[order], 0, num_pages - 1).astype(jnp.int32)
    return BlockWork(
        block_first=first,
        block_end=jnp.maximum(end, first),
        page_tables=tables.reshape(-1),
        kv_lens=kv_lens[order].astype(jnp.int32),
        q_starts=q_starts[order].astype(jnp.int32),
        q_lens=jnp.maximum(q_lens[order], 0).astype(jnp.int32),
    )


def default_pages_per_block(page_size: int, pages_per_seq: int) -> int:
    """Enough pages for a key block of at least 128 (the MXU / tensor-core width)."""
    return max(1, min(pages_per_seq, -(-128 // page_size)))
