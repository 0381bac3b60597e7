"""Single-level prefix groups (BatchLLM): each request gets at most one shared prefix."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from batchjax.schedule.prefix_tree import PrefixTree, TokenBatch


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixGroup:
    """Requests that share a prefix; each keeps at least one token of its own.

    The prefix is held as `prefix_tokens`, a view into the prompts' token array, so a plan of
    a million requests makes no Python int per prefix token; `prefix_token_ids` materialises
    it on demand. A group of one request has an empty prefix (nothing is shared).
    """

    group_id: int
    prefix_tokens: np.ndarray  # [prefix_len] int32
    request_ids: tuple[int, ...]  # indices into the input, ascending
    # The shared segments that make up the prefix, top-level first, as (segment id, end):
    # segment k covers the prefix's tokens from the previous end (0) to its own. Single-level
    # grouping gives one segment per shared prefix (`schedule.tree` for several).
    chain: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # Accepts any token sequence; an int32 view passes through without a copy.
        object.__setattr__(self, "prefix_tokens", np.asarray(self.prefix_tokens, dtype=np.int32))

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_tokens)

    @property
    def prefix_token_ids(self) -> tuple[int, ...]:
        return tuple(self.prefix_tokens.tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefixGroup):
            return NotImplemented
        return (
            self.group_id == other.group_id
            and self.request_ids == other.request_ids
            and np.array_equal(self.prefix_tokens, other.prefix_tokens)
            and self.chain == other.chain
        )

    def __hash__(self) -> int:
        return hash((self.group_id, self.request_ids, self.prefix_len))


@dataclasses.dataclass(frozen=True, eq=False)
class Grouping:
    """Single-level groups as arrays, numbered by their lowest request id.

    Group g's requests are `members[offsets[g]:offsets[g + 1]]` (ascending) and share their
    first `prefix_len[g]` tokens.
    """

    members: np.ndarray  # [N] request ids, group by group
    offsets: np.ndarray  # [G + 1] int64, offsets[0] == 0
    prefix_len: np.ndarray  # [G] int64, 0 for a group of one

    @property
    def num_groups(self) -> int:
        return len(self.prefix_len)

    @property
    def sizes(self) -> np.ndarray:
        """[G] requests per group."""
        return np.diff(self.offsets)

    @property
    def saved_tokens(self) -> int:
        """Prefill tokens saved: each group computes its prefix once, not per member."""
        return int(((self.sizes - 1) * self.prefix_len).sum())


GROUPING_METHODS = ("batchllm", "paper", "first_level", "exact")


def group_prompts(
    tree: PrefixTree, method: str = "batchllm", align_to_pages: int | None = None
) -> Grouping:
    """Splits the prompts of `tree` into single-level prefix groups.

    method:
      "batchllm"    the grouping that saves the most prefill tokens (same as "exact");
      "exact"       that grouping, found by a DP over the radix tree (`_exact_keys`);
      "paper"       first-level children of the root, enlarged by BatchLLM's heuristic rule;
      "first_level" the first-level children of the root, nothing more.
    A group's prefix is the longest prefix common to all its members, cut so that every member
    keeps at least one token, and with `align_to_pages=k` cut down to a multiple of k tokens.
    """
    if align_to_pages is not None and align_to_pages < 1:
        raise ValueError(f"align_to_pages must be >= 1, got {align_to_pages}")
    if method in ("batchllm", "exact"):
        key = _exact_keys(tree)
    elif method == "paper":
        key = _release_short_members(tree, _enlarged_group_roots(tree)[tree.node_of_prompt])
    elif method == "first_level":
        key = _first_level_keys(tree)
    else:
        raise ValueError(f"unknown grouping method {method!r}; one of {GROUPING_METHODS}")
    return _grouping_from_keys(tree, key, align_to_pages)


def group(
    tree: PrefixTree, method: str = "batchllm", align_to_pages: int | None = None
) -> tuple[PrefixGroup, ...]:
    """`group_prompts` as PrefixGroup values, numbered by their lowest request id."""
    return prefix_groups(tree.prompts, group_prompts(tree, method, align_to_pages))


def prefix_groups(
    prompts: TokenBatch, grouping: Grouping, order: np.ndarray | None = None
) -> tuple[PrefixGroup, ...]:
    """PrefixGroup values of `grouping`; the i-th is its group `order[i]`, with group_id i."""
    if order is None:
        order = np.arange(grouping.num_groups)
    members = grouping.members.tolist()
    offsets = grouping.offsets.tolist()
    first_token = prompts.offsets[grouping.members[grouping.offsets[:-1]]].tolist()  # [G]
    prefix_len = grouping.prefix_len.tolist()
    tokens = prompts.tokens
    return tuple(
        PrefixGroup(
            group_id=i,
            prefix_tokens=tokens[first_token[g] : first_token[g] + prefix_len[g]],
            request_ids=tuple(members[offsets[g] : offsets[g + 1]]),
        )
        for i, g in enumerate(order.tolist())
    )


def saved_tokens(groups: Sequence[PrefixGroup]) -> int:
    """Prefill tokens a grouping saves: each group computes its prefix once, not per member."""
    return sum((len(g.request_ids) - 1) * g.prefix_len for g in groups)


def _first_level_keys(tree: PrefixTree) -> np.ndarray:
    """[N] the first-level node above each prompt."""
    first_level = tree.children_of(0)  # their `lo` ranges tile the sorted order, ascending
    key = np.empty(tree.num_prompts, dtype=np.int64)
    position = np.arange(tree.num_prompts)
    key[tree.order] = first_level[np.searchsorted(tree.lo[first_level], position, "right") - 1]
    return key


def _enlarged_group_roots(tree: PrefixTree) -> np.ndarray:
    """[M] for every node, the node whose group its prompts join (BatchLLM prefix enlarging).

    Post-order, every node u weighs each child x: the `w` prompts still attached below x get
    a group of their own when `(w - 1) * (len(x)) > len(u)` — they would share the `len(x)`
    tokens after u's prefix, and the prompts left at u give up sharing u's `len(u)` tokens
    with them once. Children of the root always become groups (BatchLLM's first level). When a
    node is left with a single child, its prompts share that child's longer prefix, so the
    lengths are measured to the deepest prefix the attached prompts still have in common, less
    the one token a group gives back when a member ends exactly there.
    """
    depth = tree.depth.tolist()
    parent = tree.parent.tolist()
    terminals = tree.terminals.tolist()
    attached = terminals.copy()  # prompts below the node not in a deeper group
    units = [0] * tree.num_nodes  # attached children
    last_unit = [-1] * tree.num_nodes
    # The prefix the attached prompts could share: their common depth, less one if one ends there.
    shared = [d - 1 if t else d for d, t in zip(depth, terminals)]
    is_root = np.zeros(tree.num_nodes, dtype=bool)
    for node in range(tree.num_nodes - 1, 0, -1):  # children before parents
        if units[node] == 1 and attached[node] == attached[last_unit[node]]:
            shared[node] = shared[last_unit[node]]
        up = parent[node]
        w = attached[node]
        own = depth[up] - 1 if terminals[up] else depth[up]
        if up == 0 or (w - 1) * (shared[node] - own) > own:
            is_root[node] = True
        elif w:
            attached[up] += w
            units[up] += 1
            last_unit[up] = node
    root_of_node = np.arange(tree.num_nodes)
    for node in range(1, tree.num_nodes):  # pre-order: parents are resolved first
        if not is_root[node]:
            root_of_node[node] = root_of_node[parent[node]]
    return root_of_node


def _release_short_members(tree: PrefixTree, key: np.ndarray) -> np.ndarray:
    """Members that end where their group's common prefix ends (costing every member a token)
    leave as groups of one whenever that saves more. [N] keys in, [N] keys out (-1: alone)."""
    key = key.copy()
    lengths = tree.prompts.lengths
    common = _CommonPrefix(tree)

    def shared_prefix_len(ids: np.ndarray) -> int:
        if len(ids) < 2:
            return 0
        where = common.position[ids]
        shared = common.between(where.min(keepdims=True), where.max(keepdims=True))
        return min(int(shared[0]), int(lengths[ids].min()) - 1)

    members, offsets = _segments(key)
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        ids = members[start:stop]
        while len(ids) > 2:
            prefix_len = shared_prefix_len(ids)
            short = lengths[ids] == prefix_len + 1
            rest = ids[~short]
            if not short.any() or (len(rest) - 1) * shared_prefix_len(rest) <= (
                len(ids) - 1
            ) * prefix_len:
                break
            key[ids[short]] = -1
            ids = rest
    return key


def _exact_keys(tree: PrefixTree) -> np.ndarray:
    """[N] each prompt's group in the grouping that saves the most tokens (-1: alone).

    A group is a position p in the token trie (a prefix of depth d); its members are prompts
    longer than d that start with p, each joining the deepest chosen position above it, and it
    saves (members - 1) * d = members * d - d. Along an edge into node v the member set only
    changes at v itself (prompts ending at v cannot join at depth(v)), so the useful positions
    are v's bottom (depth(v), key 2v) and v's top (depth(v) - 1, key 2v + 1, which also admits
    the prompts ending at v). F(v, a) is the most saved below v when the deepest chosen
    position above has depth a: a prompt joining it adds a; choosing a position of depth d
    costs d once. At v, the prompts ending there join a or v's top, and the prompts below join
    a, v's top or v's bottom; the four undominated combinations are the options below.

    F(v, ·) is needed only at the depths of v's ancestors' positions, so the nodes of one level
    of the tree hold their tables side by side in one [nodes, 2 * level - 1] array (column 0 is
    a = 0, then bottom and top of each ancestor, outermost first), and each level is a few
    numpy calls. The work is the sum of the nodes' levels: linear in the nodes for a tree of
    bounded height.
    """
    depth, terminals = tree.depth, tree.terminals
    levels, parent_slot = _levels(tree)  # nodes of each level; index of each one's parent
    # Depths a of the ancestors' positions, per node of each level: [n_L, W_L].
    above = [np.zeros((1, 1), dtype=np.int64)]
    for level in range(1, len(levels)):
        table = above[level - 1][parent_slot[level]]
        if level > 1:
            up = depth[levels[level - 1]][parent_slot[level], None]
            table = np.concatenate([table, up, up - 1], axis=1)
        above.append(table)

    # Bottom-up: best_below [n_L, W_L] is F of the level just done at each column, choice[L]
    # the option that achieves it.
    choice: list[np.ndarray] = [np.zeros((1, 1), dtype=np.int8)] * len(levels)
    best_below = np.zeros((0, 0), dtype=np.int64)
    for level in range(len(levels) - 1, 0, -1):
        nodes = levels[level]
        a = above[level]
        width = a.shape[1]
        below = _sum_by_parent(best_below, parent_slot, level + 1, len(nodes), width + 2)
        t = terminals[nodes][:, None]
        d = depth[nodes][:, None]
        bottom, top = below[:, width, None], below[:, width + 1, None]
        options = np.stack(
            np.broadcast_arrays(
                t * a + below[:, :width],  # no group at v
                t * a + bottom - d,  # v's bottom for the prompts below
                t * (d - 1) + top - (d - 1),  # v's top for all
                t * (d - 1) + bottom - (d - 1) - d,  # v's top for the ending, bottom below
            )
        )  # [4, n_L, W_L]
        choice[level] = options.argmax(axis=0).astype(np.int8)
        best_below = np.take_along_axis(options, choice[level][None].astype(np.int64), 0)[0]

    # Top-down: follow the chosen options; each node receives its column and group key.
    key_of_node = np.full(tree.num_nodes, -1, dtype=np.int64)  # group of the prompts ending there
    column = np.zeros(1, dtype=np.int64)
    key = np.full(1, -1, dtype=np.int64)
    for level in range(1, len(levels)):
        nodes = levels[level]
        column, key = column[parent_slot[level]], key[parent_slot[level]]
        option = choice[level][np.arange(len(nodes)), column]
        width = above[level].shape[1]
        key_of_node[nodes] = np.where(option <= 1, key, 2 * nodes + 1)
        column = np.choose(option, [column, width, width + 1, width])
        key = np.choose(option, [key, 2 * nodes, 2 * nodes + 1, 2 * nodes])
    return key_of_node[tree.node_of_prompt]


def _levels(tree: PrefixTree) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Nodes level by level (the root alone at level 0), each level's nodes grouped by parent
    in the previous level's order, and for each node the index of its parent in that level."""
    levels = [np.zeros(1, dtype=np.int64)]
    parent_slot = [np.zeros(0, dtype=np.int64)]
    while True:
        parents = levels[-1]
        counts = tree.child_offsets[parents + 1] - tree.child_offsets[parents]
        if not counts.sum():
            return levels, parent_slot
        slot = np.repeat(np.arange(len(parents)), counts)
        first = np.repeat(tree.child_offsets[parents] - (np.cumsum(counts) - counts), counts)
        levels.append(tree.children[first + np.arange(len(slot))])
        parent_slot.append(slot)


def _sum_by_parent(
    child_rows: np.ndarray, parent_slot: list[np.ndarray], child_level: int, num: int, width: int
) -> np.ndarray:
    """[num, width] the children's rows summed per parent (zeros for a leaf)."""
    if child_level >= len(parent_slot):
        return np.zeros((num, width), dtype=np.int64)
    # Children come grouped by parent, so a running sum differenced at the group ends adds them.
    running = np.zeros((len(child_rows) + 1, width), dtype=np.int64)
    np.cumsum(child_rows, axis=0, out=running[1:])
    ends = np.searchsorted(parent_slot[child_level], np.arange(num + 1))
    return running[ends[1:]] - running[ends[:-1]]


class _CommonPrefix:
    """Common prefix length of prompts at sorted positions first < last: the least neighbour
    LCP between them, by a sparse table of range minima."""

    def __init__(self, tree: PrefixTree):
        self.position = np.empty(tree.num_prompts, dtype=np.int64)  # place in sorted order
        self.position[tree.order] = np.arange(tree.num_prompts)
        self._minima = [tree.lcp.astype(np.int32)]  # [k][i]: min of lcp[i : i + 2**k]
        while 2 ** len(self._minima) < tree.num_prompts:
            prev, half = self._minima[-1], 2 ** (len(self._minima) - 1)
            self._minima.append(np.minimum(prev[:-half], prev[half:]))

    def between(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """[S] min of lcp[first + 1 : last + 1] for sorted positions first < last."""
        lo, hi = first + 1, last + 1
        k = np.log2(hi - lo).astype(np.int64)
        result = np.empty(len(lo), dtype=np.int64)
        for level in np.unique(k).tolist():
            pick = k == level
            minima = self._minima[level]
            result[pick] = np.minimum(minima[lo[pick]], minima[hi[pick] - 2**level])
        return result


def _segments(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompts with equal keys as segments: members [N] (ascending in each), offsets [S + 1]."""
    members = np.argsort(key, kind="stable")
    sorted_key = key[members]
    cuts = np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1
    ends = [len(key)] if len(key) else []
    return members, np.concatenate([[0], cuts, ends]).astype(np.int64)


def _grouping_from_keys(
    tree: PrefixTree, key: np.ndarray, align_to_pages: int | None
) -> Grouping:
    """The Grouping of prompts with equal keys (-1: alone), each group with the longest
    prefix its members share, numbered by its lowest request id."""
    num_prompts = tree.num_prompts
    # A key of its own for every prompt that is alone, beyond any node key.
    key = np.where(key < 0, 2 * tree.num_nodes + np.arange(num_prompts), key)
    members, offsets = _segments(key)
    sizes = np.diff(offsets)
    if not len(sizes):
        return Grouping(members, offsets, np.zeros(0, dtype=np.int64))
    starts = offsets[:-1]
    common = _CommonPrefix(tree)
    where = common.position[members]
    first, last = np.minimum.reduceat(where, starts), np.maximum.reduceat(where, starts)
    shared = sizes > 1
    prefix_len = np.zeros(len(sizes), dtype=np.int64)
    # Cut so that the shortest member keeps a token of its own.
    shortest = np.minimum.reduceat(tree.prompts.lengths[members], starts)
    prefix_len[shared] = np.minimum(common.between(first[shared], last[shared]), shortest[shared] - 1)
    if align_to_pages:
        prefix_len -= prefix_len % align_to_pages
    # Renumber by lowest request id: members are ascending in each group, so it is the first.
    by_first = np.argsort(members[starts])
    sizes = sizes[by_first]
    new_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_offsets[1:])
    gather = np.repeat(starts[by_first] - new_offsets[:-1], sizes) + np.arange(num_prompts)
    return Grouping(members[gather], new_offsets, prefix_len[by_first])
