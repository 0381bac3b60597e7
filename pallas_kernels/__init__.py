"""Pallas attention kernels for batchjax, each beside its plain-jnp oracle (reference.py)."""

from pallas_kernels.cascade_attention import cascade_attention
from pallas_kernels.merge_attention_states import merge_attention_states
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import (
    NO_KEYS_LSE,
    cascade_attention_reference,
    merge_attention_states_reference,
    ragged_paged_attention_reference,
    shared_prefix_attention_reference,
)
from pallas_kernels.shared_prefix_attention import shared_prefix_attention

__all__ = [
    "NO_KEYS_LSE",
    "cascade_attention",
    "cascade_attention_reference",
    "merge_attention_states",
    "merge_attention_states_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "shared_prefix_attention",
    "shared_prefix_attention_reference",
]
