"""Single-level prefix groups (BatchLLM): each request gets at most one shared prefix."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from batchjax.schedule.prefix_tree import PrefixTree


@dataclasses.dataclass(frozen=True)
class PrefixGroup:
    """Requests that share `prefix_token_ids`; each keeps at least one token of its own.

    A group of one request has an empty prefix (nothing is shared).
    """

    group_id: int
    prefix_token_ids: tuple[int, ...]
    request_ids: tuple[int, ...]  # indices into the input, ascending

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_token_ids)


GROUPING_METHODS = ("batchllm", "first_level", "exact")


def group(
    tree: PrefixTree, method: str = "batchllm", align_to_pages: int | None = None
) -> tuple[PrefixGroup, ...]:
    """Splits the prompts of `tree` into single-level prefix groups.

    method:
      "batchllm"    first-level children of the root, enlarged by BatchLLM's rule;
      "first_level" the first-level children of the root, nothing more;
      "exact"       the grouping that saves the most prefill tokens (a DP over the tree).
    A group's prefix is the longest prefix common to all its members, cut so that every member
    keeps at least one token, and with `align_to_pages=k` cut down to a multiple of k tokens.
    Groups are numbered by their lowest request id.
    """
    if method == "batchllm":
        root_of_node = _enlarged_group_roots(tree)
    elif method == "first_level":
        root_of_node = _first_level_group_roots(tree)
    elif method == "exact":
        return _groups_from_members(tree, _exact_members(tree), align_to_pages)
    else:
        raise ValueError(f"unknown grouping method {method!r}; one of {GROUPING_METHODS}")
    group_of_prompt = root_of_node[tree.node_of_prompt]  # [N] a node id per group
    by_group = np.lexsort((np.arange(tree.num_prompts), group_of_prompt))
    cuts = np.flatnonzero(np.diff(group_of_prompt[by_group])) + 1
    return _groups_from_members(
        tree, np.split(by_group, cuts), align_to_pages, release_short=method == "batchllm"
    )


def saved_tokens(groups: Sequence[PrefixGroup]) -> int:
    """Prefill tokens a grouping saves: each group computes its prefix once, not per member."""
    return sum((len(g.request_ids) - 1) * g.prefix_len for g in groups)


def _first_level_group_roots(tree: PrefixTree) -> np.ndarray:
    """[M] for every node, the first-level node above it (itself if first-level)."""
    root_of_node = np.arange(tree.num_nodes)
    first_level = tree.parent == 0
    for node in range(1, tree.num_nodes):  # pre-order: parents are resolved first
        if not first_level[node]:
            root_of_node[node] = root_of_node[tree.parent[node]]
    return root_of_node


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
    for node in range(1, tree.num_nodes):
        if not is_root[node]:
            root_of_node[node] = root_of_node[parent[node]]
    return root_of_node


def _exact_members(tree: PrefixTree) -> list[np.ndarray]:
    """Members of each group of the grouping that saves the most tokens.

    A group is a position p in the token trie (a prefix of depth d); its members are prompts
    longer than d that start with p, each joining the deepest chosen position above it, and it
    saves (members - 1) * d = members * d - d. Along an edge into node v the member set only
    changes at v itself (prompts ending at v cannot join at depth(v)), so the useful positions
    are v's bottom (depth(v)) and v's top (depth(v) - 1, which also admits the prompts ending
    at v). best(v, a) is the most saved below v when the deepest chosen position above has
    depth a: a prompt joining it adds a; choosing a position of depth d costs d once.
    """
    num_nodes = tree.num_nodes
    depth = tree.depth.tolist()
    parent = tree.parent.tolist()
    terminals = tree.terminals.tolist()
    kids = [tree.children_of(v).tolist() for v in range(num_nodes)]

    def positions(v: int) -> list[int]:
        """Depths of the positions on the edge into v worth choosing."""
        if v == 0:
            return []
        top = depth[v] - 1
        return [depth[v], top] if top > depth[parent[v]] else [depth[v]]

    # The depths a node's prompts could join above it: 0 (no group) and its ancestors' positions.
    above: list[list[int]] = [[0]] * num_nodes
    for v in range(1, num_nodes):
        above[v] = above[parent[v]] + positions(parent[v])

    # Options at v: (depth joined by v's ending prompts, depth passed to children, cost).
    def options(v: int, a: int) -> list[tuple[int, int, int]]:
        opts = [(a, a, 0)]
        for pos in positions(v):
            if pos == depth[v]:
                opts.append((a, pos, pos))
            else:
                opts.append((pos, pos, pos))
                opts.append((pos, depth[v], pos + depth[v]))
        return opts

    best: list[dict[int, int]] = [{}] * num_nodes
    for v in range(num_nodes - 1, -1, -1):
        table = {}
        for a in above[v]:
            table[a] = max(
                terminals[v] * joined + sum(best[c][passed] for c in kids[v]) - cost
                for joined, passed, cost in options(v, a)
            )
        best[v] = table

    # Walk down, following the best option, and collect members per chosen position.
    members: dict[tuple[int, int], list[int]] = {}  # (node, depth) -> prompt ids
    order = tree.order.tolist()
    stack = [(0, 0, (0, 0))]  # node, depth of the group above, its key
    while stack:
        v, a, key = stack.pop()
        joined, passed, _ = max(
            options(v, a),
            key=lambda o: terminals[v] * o[0] + sum(best[c][o[1]] for c in kids[v]) - o[2],
        )
        joined_key = key if joined == a else (v, joined)
        passed_key = key if passed == a else (v, passed)
        ending = order[tree.lo[v] : tree.lo[v] + terminals[v]]
        if ending:
            members.setdefault(joined_key, []).extend(ending)
        for c in kids[v]:
            stack.append((c, passed, passed_key))
    result: list[np.ndarray] = []
    for key, ids in members.items():
        if key[1] == 0:  # no group above: each prompt stands alone
            result.extend(np.array([i]) for i in ids)
        else:
            result.append(np.array(sorted(ids)))
    return result


def _groups_from_members(
    tree: PrefixTree,
    members: Sequence[np.ndarray],
    align_to_pages: int | None,
    release_short: bool = False,
) -> tuple[PrefixGroup, ...]:
    """PrefixGroups for the given member sets, each with the longest prefix it may share.

    With `release_short`, members that end where the group's common prefix ends (which would
    cost every member a token) leave as groups of one whenever that saves more.
    """
    if align_to_pages is not None and align_to_pages < 1:
        raise ValueError(f"align_to_pages must be >= 1, got {align_to_pages}")
    position = np.empty(tree.num_prompts, dtype=np.int64)  # place of each prompt in `order`
    position[tree.order] = np.arange(tree.num_prompts)
    lengths = tree.prompts.lengths

    def shared_prefix_len(ids: np.ndarray) -> int:
        if len(ids) < 2:
            return 0
        where = position[ids]
        # The prefix common to a set of prompts is that of its first and last in order.
        common = int(tree.lcp[where.min() + 1 : where.max() + 1].min())
        return min(common, int(lengths[ids].min()) - 1)

    member_sets: list[np.ndarray] = []
    for ids in members:
        ids = np.sort(ids)
        while release_short and len(ids) > 2:
            prefix_len = shared_prefix_len(ids)
            short = lengths[ids] == prefix_len + 1
            rest = ids[~short]
            if not short.any() or (len(rest) - 1) * shared_prefix_len(rest) <= (
                len(ids) - 1
            ) * prefix_len:
                break
            member_sets.extend(ids[short, None])
            ids = rest
        member_sets.append(ids)

    groups: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for ids in member_sets:
        prefix_len = shared_prefix_len(ids)
        if align_to_pages:
            prefix_len -= prefix_len % align_to_pages
        prefix = tuple(tree.prompts[int(ids[0])][:prefix_len].tolist())
        groups.append((int(ids[0]), prefix, ids))
    groups.sort(key=lambda g: g[0])
    return tuple(
        PrefixGroup(group_id=i, prefix_token_ids=prefix, request_ids=tuple(ids.tolist()))
        for i, (_, prefix, ids) in enumerate(groups)
    )
