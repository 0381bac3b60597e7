"""The `--attention=pallas` path: the same shared-prefix attention through Pallas kernels.

Own part: `ragged_paged_attention` (causal over each sequence's own pages); prefix part:
`cascade_attention` (per level of shared segments, `shared_prefix_attention`: each
segment's queries against its pages, one dense problem), merged level by level by
`merge_attention_states`. On CPU the kernels run in interpret mode.
"""

from __future__ import annotations

import jax

from batchjax.attention import xla
from batchjax.attention.metadata import PagedAttentionMetadata
from pallas_kernels import cascade_attention, ragged_paged_attention


def shared_prefix_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, md: PagedAttentionMetadata,
    layer=None,
) -> jax.Array:
    """q: [T, Hq, D]; k_pages/v_pages: [N, page_size, Hkv, D] (or stacked `[L, ...]` with
    `layer`) -> [T, Hq, D]."""
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    k_pages, v_pages = xla.pages_as(k_pages, q.dtype), xla.pages_as(v_pages, q.dtype)
    interpret = jax.default_backend() == "cpu"
    own_o, own_l = ragged_paged_attention(
        q, k_pages, v_pages, md.seq_page_tables, md.seq_kv_lens, md.seq_q_start, md.seq_q_len,
        interpret=interpret)
    return cascade_attention(q, k_pages, v_pages, (own_o, own_l), md.group_page_tables,
                             md.group_prefix_lens, md.group_q_start, md.group_q_len,
                             interpret=interpret)[0]
