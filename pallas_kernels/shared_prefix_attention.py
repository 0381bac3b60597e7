"""Shared-prefix attention: each group's query tokens against the group's prefix, unmasked.

Group g's rows `group_q_start[g] : group_q_start[g] + group_q_len[g]` all see every one of the
`group_prefix_lens[g]` keys on the group's prefix pages. The kernel takes a block of query rows
at once, so the prefix is read from memory once per block for all of the group's queries there:
decode over a shared prefix becomes a matrix product instead of one matrix-vector product per
request. Rows owned by no group, and groups with an empty prefix, give out 0, lse NO_KEYS_LSE.
The oracle is `pallas_kernels.reference.shared_prefix_attention_reference`.
"""

import jax

from pallas_kernels.paged_attention_dispatch import Backend, Interpret, paged_attention


def shared_prefix_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    group_page_tables: jax.Array,
    group_prefix_lens: jax.Array,
    group_q_start: jax.Array,
    group_q_len: jax.Array,
    *,
    interpret: Interpret = False,
    block_q: int = 16,
    pages_per_block: int | None = None,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D]; k_pages, v_pages: [N, page_size, Hkv, D]; group_page_tables: [G, Pg];
    group_prefix_lens, group_q_start, group_q_len: [G] int32.
    Returns (out: [T, Hq, D], lse: [T, Hq] f32). A group starting on a `block_q` boundary has
    its prefix read once per `block_q` of its queries.
    """
    return paged_attention(
        q, k_pages, v_pages, group_page_tables, group_prefix_lens, group_q_start, group_q_len,
        causal=False, interpret=interpret, block_q=block_q, pages_per_block=pages_per_block,
        backend=backend,
    )
