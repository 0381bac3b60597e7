"""Per-step attention metadata, built on the host by the engine and closed over by attention.

The step's tokens are laid out flat (`T` rows), each sequence's tokens contiguous and each
group's sequences contiguous. Attention has two parts (DESIGN.md), both in ragged form, the
one that tpu-inference's ragged paged attention reads:
- own part: sequence s (a chunk of a request, or of a group's prefix) owns rows
  `seq_q_start[s] : + seq_q_len[s]` and attends causally to the first `seq_kv_lens[s]` keys
  of its own pages, this step's keys included;
- prefix part: group g owns rows `group_q_start[g] : + group_q_len[g]` (the tokens of all of
  its sequences in the step) and attends, without a mask, to its shared prefix: one dense
  problem for all of the group's queries.
Every array has a fixed size: sequences and groups are padded to `T` (q_len 0), page tables
to a width fixed for the whole job, so a step's compiled shape depends on the token count
alone and the implementations skip the padding. Tiling is theirs to choose.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttentionMetadata:
    slot_mapping: jax.Array  # [T] flat KV slot (page * page_size + offset) each token writes
    seq_page_tables: jax.Array  # [S, P] own pages of each sequence
    seq_kv_lens: jax.Array  # [S] own keys after this step's writes
    seq_q_start: jax.Array  # [S] first token row of the sequence
    seq_q_len: jax.Array  # [S] its tokens this step (0: padding)
    group_page_tables: jax.Array  # [G, Pg] shared prefix pages
    group_prefix_lens: jax.Array  # [G]
    group_q_start: jax.Array  # [G] first token row of the group's queries
    group_q_len: jax.Array  # [G] (0: padding)
