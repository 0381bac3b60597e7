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
    rows (all sharing a known prefix) compares `window` tokens of each row with the run's first
    row at once; a run with no difference skips ahead, a run with one is split on the token at
    its first differing column. All runs advance together, so a round is a few numpy calls and
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
        tokens = _window(prompts, rows, depths[run_of_pos], width)  # [A, width]
        differs = tokens != tokens[first_of_run][run_of_pos]  # [A, width]
        any_diff = differs.any(axis=1)
        first_diff = np.where(any_diff, differs.argmax(axis=1), width)  # [A]
        run_diff = np.minimum.reduceat(first_diff, first_of_run)  # [R]
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
        split_tokens = tokens[in_split][np.arange(in_split.sum()), split_column]  # [S]
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

    Every prompt must have at least one token. The walk over the sorted prompts keeps the path
    of the previous prompt on a stack: a smaller LCP closes nodes, and closes them under a new
    branching node when the LCP falls inside an edge.
    """
    prompts = as_token_batch(prompts)
    lengths = prompts.lengths
    if np.any(lengths < 1):
        raise ValueError("every prompt needs at least one token")
    order, lcp = sort_prompts(prompts)
    sorted_lengths = lengths[order].tolist()

    depth = [0]
    parent = [-1]
    lo = [0]
    hi = [len(order)]
    terminals = [0]
    node_at = [0] * len(order)  # node where the i-th sorted prompt ends
    stack = [0]  # the previous prompt's path, root first
    for i, (common, length) in enumerate(zip(lcp.tolist(), sorted_lengths)):
        closed = -1
        while depth[stack[-1]] > common:
            closed = stack.pop()
            hi[closed] = i
        if depth[stack[-1]] < common:
            # The LCP falls inside the edge into `closed`: split it with a branching node.
            branch = len(depth)
            depth.append(common)
            parent.append(stack[-1])
            lo.append(lo[closed])
            hi.append(len(order))
            terminals.append(0)
            parent[closed] = branch
            stack.append(branch)
        if depth[stack[-1]] == length:
            terminals[stack[-1]] += 1  # identical to the previous prompt
        else:
            end = len(depth)
            depth.append(length)
            parent.append(stack[-1])
            lo.append(i)
            hi.append(len(order))
            terminals.append(1)
            stack.append(end)
        node_at[i] = stack[-1]
    while len(stack) > 1:
        hi[stack.pop()] = len(order)

    depth_a = np.asarray(depth, dtype=np.int64)
    lo_a = np.asarray(lo, dtype=np.int64)
    # Pre-order: by first prompt below, ancestors (shallower) first.
    preorder = np.lexsort((depth_a, lo_a))
    new_id = np.empty_like(preorder)
    new_id[preorder] = np.arange(len(preorder))
    parent_a = np.asarray(parent, dtype=np.int64)[preorder]
    parent_a[1:] = new_id[parent_a[1:]]
    children = np.arange(1, len(preorder), dtype=np.int64)
    children = children[np.argsort(parent_a[1:], kind="stable")]
    child_offsets = np.zeros(len(preorder) + 1, dtype=np.int64)
    np.cumsum(np.bincount(parent_a[1:], minlength=len(preorder)), out=child_offsets[1:])
    node_of_prompt = np.empty(len(order), dtype=np.int64)
    node_of_prompt[order] = new_id[np.asarray(node_at, dtype=np.int64)]
    return PrefixTree(
        prompts=prompts,
        order=order,
        lcp=lcp,
        depth=depth_a[preorder],
        parent=parent_a,
        lo=lo_a[preorder],
        hi=np.asarray(hi, dtype=np.int64)[preorder],
        terminals=np.asarray(terminals, dtype=np.int64)[preorder],
        child_offsets=child_offsets,
        children=children,
        node_of_prompt=node_of_prompt,
    )
