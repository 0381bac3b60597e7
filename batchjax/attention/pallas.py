"""The `--attention=pallas` path: the same shared-prefix attention through Pallas kernels.

Own part: `ragged_paged_attention` (causal over each sequence's own pages); prefix part:
`cascade_attention` (per level of shared segments, `shared_prefix_attention`: each
segment's queries against its pages, one dense problem), merged level by level by
`merge_attention_states`. On CPU the kernels run in interpret mode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from batchjax.attention import xla
from batchjax.attention.metadata import PagedAttentionMetadata
from pallas_kernels import cascade_attention, ragged_paged_attention


def layer_view(k_pages: jax.Array, v_pages: jax.Array, md: PagedAttentionMetadata, layer):
    """The stacked pools `[L, N, page_size, Hkv, D]` as one pool `[L * N, ...]` (a free
    reshape of contiguous memory) and `md`'s page tables offset to `layer`'s pages, so a
    kernel reads that layer's pages in place. Slicing `k_pages[layer]` with a traced layer
    would copy the layer's whole pool, every layer of every step."""
    num_layers, num_pages = k_pages.shape[:2]
    k_flat = k_pages.reshape(num_layers * num_pages, *k_pages.shape[2:])
    v_flat = v_pages.reshape(num_layers * num_pages, *v_pages.shape[2:])
    offset = jnp.asarray(layer, jnp.int32) * num_pages

    def offset_table(table: jax.Array) -> jax.Array:
        # Padding entries stay inside the layer: the kernels mask their keys.
        return jnp.clip(table, 0, num_pages - 1).astype(jnp.int32) + offset

    md = dataclasses.replace(md, seq_page_tables=offset_table(md.seq_page_tables),
                             group_page_tables=offset_table(md.group_page_tables))
    return k_flat, v_flat, md


def shared_prefix_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, md: PagedAttentionMetadata,
    layer=None,
) -> jax.Array:
    """q: [T, Hq, D]; k_pages/v_pages: [N, page_size, Hkv, D], or with `layer` (may be traced)
    the stacked `[L, N, ...]`, read in place (`layer_view`) -> [T, Hq, D]."""
    if layer is not None:
        k_pages, v_pages, md = layer_view(k_pages, v_pages, md, layer)
    k_pages, v_pages = xla.pages_as(k_pages, q.dtype), xla.pages_as(v_pages, q.dtype)
    interpret = jax.default_backend() == "cpu"
    own_o, own_l = ragged_paged_attention(
        q, k_pages, v_pages, md.seq_page_tables, md.seq_kv_lens, md.seq_q_start, md.seq_q_len,
        interpret=interpret)
    return cascade_attention(q, k_pages, v_pages, (own_o, own_l), md.group_page_tables,
                             md.group_prefix_lens, md.group_q_start, md.group_q_len,
                             interpret=interpret)[0]
