"""Cascade attention over a chain of shared segments (multi-level prefix sharing).

A query's context is the chain of shared segments above it, one per level from the top,
plus its own keys. Level l holds segments side by side: segment g of level l owns the rows
`level_q_start[l, g] : + level_q_len[l, g]` (every query of its subtree, laid out
contiguously) and they attend all `level_lens[l, g]` of its keys without a mask, one dense
problem per segment (`shared_prefix_attention`). Each level's partial result merges into the
running one by log-sum-exp (`merge_attention_states`), so the result is the softmax over the
whole context. Single-level sharing is one level. The same kernels serve TPU, GPU and the
interpreter; the oracle is `pallas_kernels.reference.cascade_attention_reference`.
"""

import jax

from pallas_kernels.merge_attention_states import merge_attention_states
from pallas_kernels.paged_attention_dispatch import Backend, Interpret
from pallas_kernels.shared_prefix_attention import shared_prefix_attention


def cascade_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    own: tuple[jax.Array, jax.Array],
    level_page_tables: jax.Array,
    level_lens: jax.Array,
    level_q_start: jax.Array,
    level_q_len: jax.Array,
    *,
    interpret: Interpret = False,
    block_q: int = 16,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D]; k_pages, v_pages: [N, page_size, Hkv, D]; own: (out [T, Hq, D], lse
    [T, Hq]) of the own part (`ragged_paged_attention`); level_page_tables: [L, G, Pg];
    level_lens, level_q_start, level_q_len: [L, G] int32 (q_len 0: padding).
    Returns (out: [T, Hq, D], lse: [T, Hq] f32) over the own keys and every level's.
    """
    out, lse = own
    for level in range(level_q_len.shape[0]):
        part = shared_prefix_attention(
            q, k_pages, v_pages, level_page_tables[level], level_lens[level],
            level_q_start[level], level_q_len[level], interpret=interpret, block_q=block_q,
            backend=backend)
        out, lse = merge_attention_states(out, lse, *part, interpret=bool(interpret))
    return out, lse
