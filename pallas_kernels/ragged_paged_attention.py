"""Ragged paged attention: every query token of a flat step against its own sequence's pages.

A step mixes prefill chunks and decode tokens. Sequence s owns query rows
`seq_q_start[s] : seq_q_start[s] + seq_q_len[s]`; its keys are the first `seq_kv_lens[s]`
entries of its paged context, and its query i sits at key index
`seq_kv_lens[s] - seq_q_len[s] + i`, seeing keys up to and including that one. Padding
sequences have `seq_q_len == 0`; rows no sequence owns come out as out 0, lse NO_KEYS_LSE.
The oracle is `pallas_kernels.reference.ragged_paged_attention_reference`.
"""

import jax

from pallas_kernels.paged_attention_dispatch import Backend, Interpret, paged_attention


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    seq_page_tables: jax.Array,
    seq_kv_lens: jax.Array,
    seq_q_start: jax.Array,
    seq_q_len: jax.Array,
    *,
    interpret: Interpret = False,
    block_q: int = 16,
    pages_per_block: int | None = None,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D]; k_pages, v_pages: [N, page_size, Hkv, D]; seq_page_tables: [S, P];
    seq_kv_lens, seq_q_start, seq_q_len: [S] int32. Returns (out: [T, Hq, D], lse: [T, Hq] f32).
    """
    return paged_attention(
        q, k_pages, v_pages, seq_page_tables, seq_kv_lens, seq_q_start, seq_q_len,
        causal=True, interpret=interpret, block_q=block_q, pages_per_block=pages_per_block,
        backend=backend,
    )
