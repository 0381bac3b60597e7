"""Per-step attention metadata, built on the host by the engine and closed over by attention.

The step's tokens are laid out flat (`T` rows), each sequence's tokens contiguous and each
group's sequences contiguous. Attention has two parts (DESIGN.md), both in ragged form, the
one that tpu-inference's ragged paged attention reads:
- own part: sequence s (a chunk of a request, or of a group's prefix) owns rows
  `seq_q_start[s] : + seq_q_len[s]` and attends causally to the first `seq_kv_lens[s]` keys
  of its own pages, this step's keys included;
- prefix part, a cascade over `L` levels of shared segments: at level l, segment g owns rows
  `group_q_start[l, g] : + group_q_len[l, g]` (the tokens of every sequence below it in the
  step: a segment's subtree is laid out contiguously) and they attend, without a mask, to
  its keys: one dense problem for all of the subtree's queries. A sequence's chain of
  segments holds one per level from the top; the levels' partial results and the own part's
  merge by log-sum-exp. Single-level sharing is `L = 1`.
Every array has a fixed size: sequences and segments are padded to `T` (q_len 0), page
tables to a width fixed for the whole job and `L` too, so a step's compiled shape depends on
the token count alone and the implementations skip the padding. Tiling is theirs to choose.
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
    group_page_tables: jax.Array  # [L, G, Pg] pages of each level's shared segments
    group_prefix_lens: jax.Array  # [L, G] the segments' tokens
    group_q_start: jax.Array  # [L, G] first token row of the segment's queries
    group_q_len: jax.Array  # [L, G] (0: padding)

    @property
    def prefix_levels(self) -> int:
        return self.group_q_len.shape[0]

    def level(self, l: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Level l's (page tables, lengths, q starts, q lens): a single-level prefix part."""
        return (self.group_page_tables[l], self.group_prefix_lens[l], self.group_q_start[l],
                self.group_q_len[l])
