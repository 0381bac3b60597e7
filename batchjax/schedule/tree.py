"""Multi-level prefix sharing: the batch's shared segments as a tree, and its depth-first order.

Single-level grouping (`grouping.py`, BatchLLM) gives each request at most one shared prefix,
so on nested batches (one system prompt over many documents, each over many questions) the
outer prefix is computed once per inner group. Here every level is shared: a *segment* is a
span of tokens `start:end` that every prompt below it has; a request's context is the chain of
segments from a top-level one down to the deepest one it starts with, plus its own tokens.

The segments come from the radix tree (`prefix_tree.PrefixTree`): every node with two or more
prompts below it is a candidate whose segment ends at its depth (one token earlier when a
prompt ends exactly there, so that every request keeps a token of its own). A candidate is
kept when sharing it pays: with `u` units under it (kept child segments and prompts that
attach to it directly) and a segment of `s` tokens, keeping it computes those tokens once
instead of `u` times, so it stays when `(u - 1) * s >= min_saved_tokens`; otherwise it merges
into its parent (its tokens move into its units). Decided children first, so a node sees its
final units. If the tree is then deeper than `max_levels`, the least valuable segment on a
too-long path is merged, one at a time, until no path is.

A request joins the deepest kept segment it starts with; requests that join the same segment
form one *group* (the batcher's unit of admission), whose prefix is the whole chain. The run
order walks the tree depth first, so a subtree's requests run close together and its segments
live only as long as it does; siblings run decode-first (`ordering.decode_first_key` of the
subtree's mean decode estimate over the prefill tokens it computes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from batchjax.schedule import ordering
from batchjax.schedule.grouping import Grouping
from batchjax.schedule.prefix_tree import PrefixTree

DEFAULT_MAX_LEVELS = 4
DEFAULT_MIN_SAVED_TOKENS = 16


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentTree:
    """Shared segments: node k covers tokens `start[k]:end[k]` of every prompt below it.

    Nodes are numbered parents first (`parent[k] < k`); `start[k]` is its parent's end (0 at
    the top) and `level[k]` its place in a chain (1 at the top).
    """

    parent: np.ndarray  # [K] int64, -1 for a top-level segment
    start: np.ndarray  # [K] int64
    end: np.ndarray  # [K] int64
    level: np.ndarray  # [K] int64

    @staticmethod
    def empty() -> SegmentTree:
        z = np.zeros(0, dtype=np.int64)
        return SegmentTree(z, z, z, z)

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def depth(self) -> int:
        """Segments in the longest chain (0: nothing is shared)."""
        return int(self.level.max()) if len(self.level) else 0

    @property
    def shared_tokens(self) -> int:
        """Tokens of all segments: what computing each segment once costs."""
        return int((self.end - self.start).sum())

    def chain(self, node: int) -> tuple[int, ...]:
        """Node ids from the top-level segment down to `node` (empty for -1)."""
        out = []
        while node >= 0:
            out.append(node)
            node = int(self.parent[node])
        return tuple(reversed(out))


@dataclasses.dataclass(frozen=True, eq=False)
class TreeGrouping:
    """Groups of requests that join the same segment, and the segments above them.

    `grouping` numbers groups by lowest request id (as every grouping does) with
    `prefix_len[g]` the end of the group's segment; `segment_of_group[g]` is that segment
    (-1: the request shares nothing); `run_order` lists group indices depth first.
    """

    grouping: Grouping
    segment_of_group: np.ndarray  # [G] int64
    segments: SegmentTree
    run_order: np.ndarray  # [G] int64

    @property
    def saved_tokens(self) -> int:
        """Prefill tokens saved against computing every prompt whole."""
        g = self.grouping
        return int((g.sizes * g.prefix_len).sum()) - self.segments.shared_tokens


def tree_grouping(
    tree: PrefixTree,
    decode: np.ndarray,
    max_levels: int = DEFAULT_MAX_LEVELS,
    min_saved_tokens: int = DEFAULT_MIN_SAVED_TOKENS,
    order_key: ordering.OrderKey = ordering.decode_first_key,
) -> TreeGrouping:
    """The segment tree of `tree`'s prompts, their groups and the depth-first run order.

    decode: [N] decode estimate per prompt (ordering only).
    """
    if max_levels < 1:
        raise ValueError(f"max_levels must be >= 1, got {max_levels}")
    if min_saved_tokens < 1:
        raise ValueError(f"min_saved_tokens must be >= 1, got {min_saved_tokens}")
    keep, units, cut = _select(tree, min_saved_tokens)
    kept_parent = _kept_parents(tree, keep)
    _cap_depth(keep, kept_parent, units, cut, max_levels)
    nodes = np.flatnonzero(keep)  # pre-order ids: parents first
    new_id = np.full(tree.num_nodes + 1, -1, dtype=np.int64)  # index -1 reads -1: none
    new_id[nodes] = np.arange(len(nodes))
    parent = new_id[kept_parent[nodes]]
    end = cut[nodes]
    start = np.where(parent >= 0, end[np.maximum(parent, 0)], 0)
    level = np.ones(len(nodes), dtype=np.int64)
    for k in range(len(nodes)):  # parents first
        if parent[k] >= 0:
            level[k] = level[parent[k]] + 1
    segments = SegmentTree(parent.astype(np.int64), start.astype(np.int64),
                           end.astype(np.int64), level)

    # Each prompt joins the deepest kept segment at or above the node where it ends.
    nearest = _nearest_kept(tree, keep)
    segment_of_prompt = new_id[nearest[tree.node_of_prompt]]
    grouping, segment_of_group = _groups(segment_of_prompt, segments)
    run_order = _depth_first(grouping, segment_of_group, segments,
                             np.asarray(decode, dtype=np.float64), tree.prompts.lengths,
                             order_key)
    return TreeGrouping(grouping, segment_of_group, segments, run_order)


def _select(tree: PrefixTree, min_saved: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Children first, which candidates pay (`keep` [M] bool), each node's units [M] and the
    depth where each node's segment would end (`cut` [M])."""
    num = tree.num_nodes
    parent = tree.parent.tolist()
    terminals = tree.terminals.tolist()
    below = (tree.hi - tree.lo).tolist()
    depth = tree.depth.tolist()
    cut = [d - 1 if t else d for d, t in zip(depth, terminals)]
    cut[0] = 0
    units = terminals.copy()  # prompts that end at the node join it directly
    keep = [False] * num
    for v in range(num - 1, 0, -1):  # pre-order ids backwards: children before parents
        p = parent[v]
        if below[v] < 2:  # one prompt below: a unit of its parent
            units[p] += 1
            continue
        seg = cut[v] - cut[p]
        if seg > 0 and (units[v] - 1) * seg >= min_saved:
            keep[v] = True
            units[p] += 1
        else:  # merged into the parent: its units become the parent's
            units[p] += units[v]
    return (np.asarray(keep, dtype=bool), np.asarray(units, dtype=np.int64),
            np.asarray(cut, dtype=np.int64))


def _nearest_kept(tree: PrefixTree, keep: np.ndarray) -> np.ndarray:
    """[M] the node itself if kept, else its nearest kept ancestor (-1: none)."""
    parent = tree.parent.tolist()
    keep_l = keep.tolist()
    nearest = [-1] * tree.num_nodes
    for v in range(1, tree.num_nodes):  # parents first
        nearest[v] = v if keep_l[v] else nearest[parent[v]]
    return np.asarray(nearest, dtype=np.int64)


def _kept_parents(tree: PrefixTree, keep: np.ndarray) -> np.ndarray:
    """[M] each node's nearest kept proper ancestor (-1: none)."""
    nearest = _nearest_kept(tree, keep)
    kp = np.full(tree.num_nodes, -1, dtype=np.int64)
    kp[1:] = nearest[tree.parent[1:]]
    return kp


def _cap_depth(keep: np.ndarray, kept_parent: np.ndarray, units: np.ndarray, cut: np.ndarray,
               max_levels: int) -> None:
    """Merges segments, least saving first, until no chain is longer than `max_levels`.
    Updates the arrays in place (`kept_parent` of the merged nodes' children, the units of
    their parents)."""
    while True:
        nodes = np.flatnonzero(keep).tolist()
        level, height = {}, {}
        for v in nodes:  # parents first
            p = int(kept_parent[v])
            level[v] = level[p] + 1 if p >= 0 else 1
        if not nodes or max(level.values()) <= max_levels:
            return
        for v in reversed(nodes):  # children first
            height.setdefault(v, 1)
            p = int(kept_parent[v])
            if p >= 0:
                height[p] = max(height.get(p, 1), height[v] + 1)
        over = [v for v in nodes if level[v] + height[v] - 1 > max_levels]

        def saving(v: int) -> tuple[int, int]:
            p = int(kept_parent[v])
            seg = int(cut[v] - (cut[p] if p >= 0 else 0))
            return int(units[v] - 1) * seg, -level[v]  # ties: the deeper one

        victim = min(over, key=saving)
        keep[victim] = False
        p = int(kept_parent[victim])
        if p >= 0:
            units[p] += units[victim] - 1
        kept_parent[kept_parent == victim] = p


def _groups(segment_of_prompt: np.ndarray,
            segments: SegmentTree) -> tuple[Grouping, np.ndarray]:
    """Prompts with the same segment as groups (each prompt sharing nothing alone), numbered
    by lowest request id; [G] the segment of each group."""
    num = len(segment_of_prompt)
    key = np.where(segment_of_prompt >= 0, segment_of_prompt,
                   segments.num_nodes + np.arange(num))
    members = np.argsort(key, kind="stable")
    sorted_key = key[members]
    cuts = np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1
    offsets = np.concatenate([[0], cuts, [num] if num else []]).astype(np.int64)
    starts = offsets[:-1]
    seg = np.where(sorted_key[starts] < segments.num_nodes, sorted_key[starts], -1)
    by_first = np.argsort(members[starts], kind="stable")
    sizes = np.diff(offsets)[by_first]
    new_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_offsets[1:])
    gather = np.repeat(starts[by_first] - new_offsets[:-1], sizes) + np.arange(num)
    seg = seg[by_first]
    ends = np.concatenate([segments.end, [0]])  # index -1 reads 0: no prefix
    prefix_len = ends[seg]
    return Grouping(members[gather], new_offsets, prefix_len.astype(np.int64)), seg


def _depth_first(grouping: Grouping, segment_of_group: np.ndarray, segments: SegmentTree,
                 decode: np.ndarray, lengths: np.ndarray,
                 key: ordering.OrderKey) -> np.ndarray:
    """[G] group indices depth first; siblings (child segments and the group that joins a
    segment directly) by `key` of their mean decode over the prefill they compute."""
    num_groups, num_nodes = grouping.num_groups, segments.num_nodes
    if not num_groups:
        return np.zeros(0, dtype=np.int64)
    starts = grouping.offsets[:-1]
    members = grouping.members
    own = lengths[members] - np.repeat(grouping.prefix_len, grouping.sizes)
    group_prefill = np.add.reduceat(own, starts).astype(np.float64)
    group_decode = np.add.reduceat(decode[members], starts)
    group_first = members[starts]
    # Subtree totals, children first (ids are parents first).
    seg_len = (segments.end - segments.start).astype(np.float64)
    prefill = seg_len.copy()
    decode_sum = np.zeros(num_nodes)
    count = np.zeros(num_nodes)
    first = np.full(num_nodes, np.iinfo(np.int64).max)
    has = segment_of_group >= 0
    np.add.at(prefill, segment_of_group[has], group_prefill[has])
    np.add.at(decode_sum, segment_of_group[has], group_decode[has])
    np.add.at(count, segment_of_group[has], grouping.sizes[has])
    np.minimum.at(first, segment_of_group[has], group_first[has])
    for k in range(num_nodes - 1, -1, -1):
        p = segments.parent[k]
        if p >= 0:
            prefill[p] += prefill[k]
            decode_sum[p] += decode_sum[k]
            count[p] += count[k]
            first[p] = min(first[p], first[k])
    # Units: ('n', node) for a segment's subtree, ('g', group) for a group; keyed under their
    # parent segment (-1: the top).
    children: dict[int, list[tuple[float, int, str, int]]] = {}
    node_score = key(decode_sum / np.maximum(count, 1), prefill)
    group_score = key(group_decode / grouping.sizes, group_prefill)
    for k in range(num_nodes):
        children.setdefault(int(segments.parent[k]), []).append(
            (-float(node_score[k]), int(first[k]), "n", k))
    for g in range(num_groups):
        children.setdefault(int(segment_of_group[g]), []).append(
            (-float(group_score[g]), int(group_first[g]), "g", g))
    out: list[int] = []
    stack = [("n", -1)]
    while stack:
        kind, unit = stack.pop()
        if kind == "g":
            out.append(unit)
            continue
        below = sorted(children.get(unit, ()))
        stack.extend((k, u) for _, _, k, u in reversed(below))
    return np.asarray(out, dtype=np.int64)
