"""Prompts as one flat token array, and the token-level prefix tree (radix tree) over them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class TokenBatch(Sequence[np.ndarray]):
    """Many prompts held as one flat int32 array, so a million prompts cost no Python objects.

    Prompt i is `tokens[offsets[i]:offsets[i + 1]]`; indexing returns that view.
    """

    tokens: np.ndarray  # [total_tokens] int32, token ids >= 0
    offsets: np.ndarray  # [N + 1] int64, ascending, offsets[0] == 0

    @staticmethod
    def from_sequences(prompts: Sequence[Sequence[int] | np.ndarray]) -> TokenBatch:
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        for i, prompt in enumerate(prompts):
            tokens[offsets[i] : offsets[i + 1]] = prompt
        return TokenBatch(tokens, offsets)

    @staticmethod
    def from_padded(rows: np.ndarray, lengths: np.ndarray | None = None) -> TokenBatch:
        """rows: [N, L] int32. Without `lengths` every row is a whole prompt (a free view)."""
        num_rows, width = rows.shape
        if lengths is None:
            return TokenBatch(
                np.ascontiguousarray(rows, dtype=np.int32).reshape(-1),
                np.arange(num_rows + 1, dtype=np.int64) * width,
            )
        lengths = np.asarray(lengths, dtype=np.int64)
        keep = np.arange(width)[None, :] < lengths[:, None]  # [N, L]
        offsets = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenBatch(np.asarray(rows, dtype=np.int32)[keep], offsets)

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64 prompt lengths."""
        return np.diff(self.offsets)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.tokens[self.offsets[i] : self.offsets[i + 1]]


def as_token_batch(prompts: TokenBatch | Sequence[Sequence[int] | np.ndarray]) -> TokenBatch:
    return prompts if isinstance(prompts, TokenBatch) else TokenBatch.from_sequences(prompts)


_END = -1  # what a prompt reads past its end: sorts before every token id
_MAX_WINDOW = 1 << 13


def _window(
    prompts: TokenBatch, rows: np.ndarray, depths: np.ndarray, width: int
) -> np.ndarray:
    """tokens [len(rows), width] of each row from its depth on; `_END` past the row's end."""
    flat = prompts.tokens
    total = len(flat)
    starts = prompts.offsets[rows] + depths  # [A]
    # Rows of `width` consecutive tokens as a strided view: gathering them copies whole rows,
    # several times faster than gathering token by token. Windows that would run past the
    # array's end come from a short padded copy of its tail.
    tail = np.full(2 * width, _END, dtype=flat.dtype)
    tail_start = max(total - width, 0)
    tail[: total - tail_start] = flat[tail_start:]
    if total >= width:
        body = np.lib.stride_tricks.as_strided(
            flat, shape=(total - width + 1, width), strides=(flat.strides[0],) * 2
        )
        tokens = body[np.minimum(starts, total - width)]  # [A, width]
    else:
        tokens = np.empty((len(rows), width), dtype=flat.dtype)
    from_tail = np.flatnonzero(starts > total - width)
    tokens[from_tail] = np.lib.stride_tricks.sliding_window_view(tail, width)[
        starts[from_tail] - tail_start
    ]
    remaining = prompts.offsets[rows + 1] - starts  # [A] tokens left in each row
    near_end = np.flatnonzero(remaining < width)
    tokens[near_end] = np.where(
        np.arange(width)[None, :] < remaining[near_end, None], tokens[near_end], _END
    )
    return tokens


def sort_prompts(
    prompts: TokenBatch, window: int = 128, round_tokens: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of the prompts and the LCP of each with its sorted predecessor.

    A most-significant-first radix sort that jumps over common spans: every unsorted run of
    rows (all sharing a known prefix) reads the next `window` tokens of each row at once and
    compares neighbours; a run with no difference skips ahead, a run with one is split on the
    token at its first differing column. All runs advance together, so a round is a few numpy calls and
    the work is about one read of every token. A prompt that ends sorts before its extensions.

    Returns order [N] (prompt ids) and lcp [N] (lcp[0] == 0; lcp[i] is the common prefix
    length of prompts order[i - 1] and order[i]).
    """
    num_prompts = len(prompts)
    order = np.arange(num_prompts, dtype=np.int64)
    lcp = np.zeros(num_prompts, dtype=np.int64)
    # Unsorted runs: order[start:stop] all share their first `depth` tokens.
    starts = np.zeros(1 if num_prompts > 1 else 0, dtype=np.int64)
    stops = np.full_like(starts, num_prompts)
    depths = np.zeros_like(starts)
    while len(starts):
        sizes = stops - starts
        first_of_run = np.cumsum(sizes) - sizes  # [R] index into the A active rows
        run_of_pos = np.repeat(np.arange(len(starts)), sizes)  # [A]
        pos = np.arange(len(run_of_pos)) + np.repeat(starts - first_of_run, sizes)  # [A]
        rows = order[pos]
        # Few active rows read wider windows, so long shared spans take fewer rounds.
        width = max(window, min(round_tokens // len(rows), _MAX_WINDOW))
        width += width % 2  # even, so that token pairs can be compared as one int64
        tokens = _window(prompts, rows, depths[run_of_pos], width)  # [A, width]
        # A run's rows all agree up to the first column where some pair of neighbours differs,
        # so comparing neighbours (shifted views, no gather) finds each run's split column.
        pairs = tokens.view(np.int64)  # [A, width / 2]: half the elements to compare
        differs = pairs[1:] != pairs[:-1]  # [A - 1, width / 2], row i - 1 against row i
        first_pair = differs.argmax(axis=1)
        neighbours = np.arange(len(first_pair))
        column = 2 * first_pair
        column += tokens[neighbours + 1, column] == tokens[neighbours, column]  # the second half
        pair_diff = np.where(differs[neighbours, first_pair], column, width)
        row_diff = np.concatenate([[width], pair_diff])  # [A] against the previous row
        row_diff[first_of_run] = width  # the previous row is in another run
        run_diff = np.minimum.reduceat(row_diff, first_of_run)  # [R]
        leader_ended = tokens[first_of_run, -1] == _END  # the window reached past its end

        # Runs that read identical windows: identical prompts if they ended, else skip ahead.
        same = run_diff == width
        identical = same & leader_ended
        for start, stop, depth, row in zip(
            starts[identical], stops[identical], depths[identical], order[starts[identical]]
        ):
            lcp[start + 1 : stop] = prompts.offsets[row + 1] - prompts.offsets[row]
        skip = same & ~leader_ended

        # Runs that differ: stable sort by the token at the first differing column.
        split = ~same
        in_split = split[run_of_pos]
        split_column = run_diff[run_of_pos][in_split]  # [S]
        split_tokens = tokens[np.flatnonzero(in_split), split_column]  # [S]
        split_runs = run_of_pos[in_split]
        by_token = np.lexsort((split_tokens, split_runs))
        split_pos = pos[in_split]
        order[split_pos] = rows[in_split][by_token]
        split_tokens = split_tokens[by_token]
        split_runs = split_runs[by_token]
        split_depth = (depths + run_diff)[split_runs]  # [S] the first differing column
        new_sub = np.ones(len(split_pos), dtype=bool)
        new_sub[1:] = (split_runs[1:] != split_runs[:-1]) | (split_tokens[1:] != split_tokens[:-1])
        inner_boundary = new_sub.copy()  # a new sub-run that is not the first of its run
        inner_boundary[:1] = False
        inner_boundary[1:] &= split_runs[1:] == split_runs[:-1]
        lcp[split_pos[inner_boundary]] = split_depth[inner_boundary]
        sub_first = np.flatnonzero(new_sub)
        sub_last = np.append(sub_first[1:], len(split_pos))
        sub_start = split_pos[sub_first]
        sub_stop = sub_start + (sub_last - sub_first)
        sub_depth = split_depth[sub_first]
        ended = split_tokens[sub_first] == _END
        # Rows that all ended at the split column are identical prompts: sorted already.
        for start, stop, depth in zip(sub_start[ended], sub_stop[ended], sub_depth[ended]):
            lcp[start + 1 : stop] = depth
        keep = ~ended & (sub_stop - sub_start > 1)

        starts = np.concatenate([starts[skip], sub_start[keep]])
        stops = np.concatenate([stops[skip], sub_stop[keep]])
        depths = np.concatenate([depths[skip] + width, sub_depth[keep] + 1])
    return order, lcp


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixTree:
    """The radix tree of all prompts: a node per branching point and per prompt end.

    Nodes are numbered in pre-order (node 0 is the root, at depth 0; a parent's id is smaller
    than its children's), so iterating ids backwards visits children before parents. The
    prompts below node v are `order[lo[v]:hi[v]]`, and the first `terminals[v]` of them end
    exactly at v. Node v's edge is the tokens `depth[parent[v]]:depth[v]` of any prompt below it.
    """

    prompts: TokenBatch
    order: np.ndarray  # [N] prompt ids in lexicographic order
    lcp: np.ndarray  # [N] common prefix length with the sorted predecessor (lcp[0] == 0)
    depth: np.ndarray  # [M] tokens from the root to the node
    parent: np.ndarray  # [M] parent node id (-1 for the root)
    lo: np.ndarray  # [M] first position in `order` below the node
    hi: np.ndarray  # [M] one past the last position in `order` below the node
    terminals: np.ndarray  # [M] prompts that end exactly at the node
    child_offsets: np.ndarray  # [M + 1] children of v: children[child_offsets[v]:...[v + 1]]
    children: np.ndarray  # [M - 1] node ids, grouped by parent, each group in `lo` order
    node_of_prompt: np.ndarray  # [N] the node where each prompt ends

    @property
    def num_prompts(self) -> int:
        return len(self.order)

    @property
    def num_nodes(self) -> int:
        return len(self.depth)

    @property
    def num_trie_nodes(self) -> int:
        """Distinct non-empty prefixes: the fewest prompt tokens any plan must compute."""
        return int((self.prompts.lengths[self.order] - self.lcp).sum())

    @property
    def logical_prefill_tokens(self) -> int:
        return self.prompts.total_tokens

    @property
    def optimal_saving_ratio(self) -> float:
        logical = self.logical_prefill_tokens
        return 1.0 - self.num_trie_nodes / logical if logical else 0.0

    def num_below(self, node: int) -> int:
        return int(self.hi[node] - self.lo[node])

    def children_of(self, node: int) -> np.ndarray:
        return self.children[self.child_offsets[node] : self.child_offsets[node + 1]]

    def prompts_below(self, node: int) -> np.ndarray:
        return self.order[self.lo[node] : self.hi[node]]

    def edge_token_ids(self, node: int) -> np.ndarray:
        """The tokens on the edge from the node's parent to the node."""
        if node == 0:
            return self.prompts.tokens[:0]
        prompt = self.prompts[int(self.order[self.lo[node]])]
        return prompt[self.depth[self.parent[node]] : self.depth[node]]

    def path_token_ids(self, node: int) -> np.ndarray:
        """The prefix that every prompt below the node starts with."""
        return self.prompts[int(self.order[self.lo[node]])][: self.depth[node]]


def identify_prefixes(prompts: TokenBatch | Sequence[Sequence[int] | np.ndarray]) -> PrefixTree:
    """Builds the radix tree of the prompts from their sorted order and neighbour LCPs.

    Every prompt must have at least one token. Interleave the sorted prompts' lengths with the
    LCPs between neighbours, padded with a 0 at each end: [0, len_0, lcp_1, len_1, ...,
    len_{N-1}, 0]. A node of depth d is a maximal run of values >= d that holds a d; its
    prompts are the lengths inside the run, and its parent is the node of the larger of the
    two smaller values that bound the run. So the whole tree comes from nearest-smaller-value
    searches, in numpy.
    """
    prompts = as_token_batch(prompts)
    lengths = prompts.lengths
    if np.any(lengths < 1):
        raise ValueError("every prompt needs at least one token")
    order, lcp = sort_prompts(prompts)
    num_prompts = len(order)
    values = np.zeros(2 * num_prompts + 1, dtype=np.int64)  # [2N + 1]
    values[1::2] = lengths[order]
    values[2:-1:2] = lcp[1:]
    left = _nearest_smaller(values)  # -1: none
    right = len(values) - 1 - _nearest_smaller(values[::-1])[::-1]  # len(values): none
    # A node is identified by its run's left bound and its depth; sorting by both is pre-order
    # (by first prompt below, then ancestors first), since a run's first prompt is left // 2.
    node_key = (left + 1) * (int(values.max()) + 1) + values
    keys, first, node_of_value = np.unique(node_key, return_index=True, return_inverse=True)
    num_nodes = len(keys)
    node_of_value = node_of_value.reshape(-1)
    left, right = left[first], right[first]  # [M] the bounds of each node's run
    bounded = np.concatenate([values, [-1]])  # index -1 and len(values) read -1: no bound
    right_value = bounded[np.minimum(right, len(values))]
    up = np.where(bounded[left] >= right_value, left, right)  # [M] the nearer-depth bound
    parent = np.full(num_nodes, -1, dtype=np.int64)
    parent[1:] = node_of_value[up[1:]]
    lo = np.maximum(left, 0) // 2
    hi = np.minimum(right // 2, num_prompts)
    node_at = node_of_value[1::2]  # [N] node where each sorted prompt ends
    terminals = np.bincount(node_at, minlength=num_nodes)
    children = np.arange(1, num_nodes, dtype=np.int64)
    children = children[np.argsort(parent[1:], kind="stable")]
    child_offsets = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(parent[1:], minlength=num_nodes), out=child_offsets[1:])
    node_of_prompt = np.empty(num_prompts, dtype=np.int64)
    node_of_prompt[order] = node_at
    return PrefixTree(
        prompts=prompts,
        order=order,
        lcp=lcp,
        depth=values[first],
        parent=parent,
        lo=lo,
        hi=hi,
        terminals=terminals,
        child_offsets=child_offsets,
        children=children,
        node_of_prompt=node_of_prompt,
    )


def _nearest_smaller(values: np.ndarray) -> np.ndarray:
    """[K] for each index, the nearest index to its left holding a smaller value (-1: none).

    values: [K] >= 0. Pointer jumping: each index points at a left neighbour such that all
    values in between are >= its own; while the pointed value is not smaller, jump to where
    that index points (everything skipped is >= it, so >= ours). All indices jump at once,
    so a long descent takes logarithmically many rounds.
    """
    with_bound = np.concatenate([values, [-1]])  # pointer -1 reads -1: smaller than any value
    pointer = np.arange(len(values), dtype=np.int64) - 1
    active = np.arange(1, len(values), dtype=np.int64)
    while len(active):
        active = active[with_bound[pointer[active]] >= values[active]]
        pointer[active] = pointer[pointer[active]]
    return pointer
