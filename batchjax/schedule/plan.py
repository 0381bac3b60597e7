"""The whole planning pipeline: identify prefixes -> group -> order, as one frozen Plan.

Grouping is multi-level by default (`schedule.tree`: the shared segments as a tree, run depth
first); `prefix_levels=1` keeps BatchLLM's single-level grouping (`schedule.grouping`), which
the paper's tables are reproduced with.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from batchjax.schedule import grouping, ordering, tree as segment_tree
from batchjax.schedule.grouping import PrefixGroup
from batchjax.schedule.prefix_tree import TokenBatch, identify_prefixes
from batchjax.schedule.step_plan import SchedRequest
from batchjax.schedule.tree import SegmentTree


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Groups in execution order, with per-request lookups for the batcher.

    `groups[g].group_id == g`: groups are renumbered in execution order. Within a group,
    `request_order[g]` is the execution order (`groups[g].request_ids` stays ascending).
    """

    prompts: TokenBatch
    groups: tuple[PrefixGroup, ...]
    request_order: tuple[tuple[int, ...], ...]  # per group, request ids in execution order
    group_of_request: np.ndarray  # [N] group id of each request
    prefix_len_of_request: np.ndarray  # [N] its group's shared prefix length
    logical_prefill_tokens: int
    planned_prefill_tokens: int  # each shared prefix once, plus every suffix
    optimal_saving_ratio: float  # 1 - trie nodes / logical tokens: no plan saves more
    plan_s: float  # wall time of planning
    segments: SegmentTree = dataclasses.field(default_factory=SegmentTree.empty)

    @property
    def prefix_levels(self) -> int:
        """Segments in the longest chain: 1 for single-level sharing, 0 for none."""
        return self.segments.depth

    @property
    def num_prefix_nodes(self) -> int:
        return self.segments.num_nodes

    def new_prefix_lens(self) -> np.ndarray:
        """[G] `new_prefix_lens` of the plan's groups."""
        return new_prefix_lens(self.groups)

    def subtree_of_group(self) -> np.ndarray:
        """[G] the top-level segment above each group; a group that shares nothing is a
        subtree of its own (`num_prefix_nodes + g`). Data-parallel replicas take whole
        subtrees, so every segment is computed on one replica only."""
        return np.array([g.chain[0][0] if g.chain else self.num_prefix_nodes + k
                         for k, g in enumerate(self.groups)], dtype=np.int64)

    def group_work(self) -> list[tuple[int, tuple[int, ...], tuple[int, ...], tuple]]:
        """Every group as a batcher takes it, in run order: (group_id, prefix_token_ids,
        request_ids in run order, chain of (segment id, end))."""
        return [(g.group_id, g.prefix_token_ids, ids, g.chain)
                for g, ids in zip(self.groups, self.request_order)]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_requests(self) -> int:
        return len(self.group_of_request)

    @property
    def saving_ratio(self) -> float:
        logical = self.logical_prefill_tokens
        return 1.0 - self.planned_prefill_tokens / logical if logical else 0.0

    def suffix_token_ids(self, request_id: int) -> np.ndarray:
        """The request's own tokens, after its group's shared prefix (at least one)."""
        return self.prompts[request_id][self.prefix_len_of_request[request_id] :]

    def execution_order(self) -> np.ndarray:
        """[N] all request ids, group by group, in execution order."""
        return np.fromiter(
            (r for ids in self.request_order for r in ids), dtype=np.int64, count=self.num_requests
        )


def build_plan(
    requests: Sequence[SchedRequest],
    grouping_method: str = "batchllm",
    align_to_pages: int | None = None,
    order_key: ordering.OrderKey = ordering.decode_first_key,
    prefix_levels: int | None = None,
    min_saved_tokens: int = segment_tree.DEFAULT_MIN_SAVED_TOKENS,
) -> Plan:
    """Plans SchedRequests (token-id prompts with their decode limits).

    A request that needs logits before its last prompt token (`SchedRequest.logits_from`)
    is planned on a key whose token there is its own: the prompts part ways at that
    position, so no shared segment reaches it.
    """
    start = time.perf_counter()
    prompts = TokenBatch.from_sequences([r.prompt_token_ids for r in requests])
    keys = prompts
    capped = [i for i, r in enumerate(requests) if r.shareable_len < len(r.prompt_token_ids) - 1]
    if capped:
        tokens = prompts.tokens.copy()
        for i in capped:  # ids above any vocabulary, one per request
            tokens[prompts.offsets[i] + requests[i].shareable_len] = _KEY_BASE + i
        keys = TokenBatch(tokens, prompts.offsets)
    plan = build_plan_from_tokens(
        keys,
        ordering.decode_estimates(requests),
        grouping_method,
        align_to_pages,
        order_key,
        prefix_levels=prefix_levels,
        min_saved_tokens=min_saved_tokens,
        _started=start,
    )
    return dataclasses.replace(plan, prompts=prompts) if capped else plan


_KEY_BASE = 1 << 30  # planning keys of requests that score their prompt (build_plan)


def build_plan_from_tokens(
    prompts: TokenBatch,
    decode: np.ndarray,
    grouping_method: str = "batchllm",
    align_to_pages: int | None = None,
    order_key: ordering.OrderKey = ordering.decode_first_key,
    prefix_levels: int | None = None,
    min_saved_tokens: int = segment_tree.DEFAULT_MIN_SAVED_TOKENS,
    _started: float | None = None,
) -> Plan:
    """Plans prompts held as one TokenBatch; decode: [N] expected output lengths.

    `prefix_levels`: the most shared segments in a request's chain (1: BatchLLM's single
    level, grouped by `grouping_method`; None: `tree.DEFAULT_MAX_LEVELS` for the default
    method, 1 for the single-level ones and with `align_to_pages`); `min_saved_tokens`: the least a segment must save
    to be kept (`schedule.tree`). The entry point for very large batches, where a Python
    object per prompt is too dear.
    """
    start = time.perf_counter() if _started is None else _started
    if prefix_levels is None:
        single = grouping_method != "batchllm" or align_to_pages is not None
        prefix_levels = 1 if single else segment_tree.DEFAULT_MAX_LEVELS
    if prefix_levels < 1:
        raise ValueError(f"prefix_levels must be >= 1, got {prefix_levels}")
    multi = prefix_levels > 1
    if multi and grouping_method != "batchllm":
        raise ValueError(f"grouping_method={grouping_method!r} is single-level: it needs "
                         f"prefix_levels=1 (got {prefix_levels})")
    if multi and align_to_pages is not None:
        raise ValueError("align_to_pages applies to single-level grouping: it needs "
                         f"prefix_levels=1 (got {prefix_levels})")
    tree = identify_prefixes(prompts)
    lengths = prompts.lengths
    decode = np.asarray(decode, dtype=np.float64)
    if multi:
        nested = segment_tree.tree_grouping(tree, decode, prefix_levels, min_saved_tokens,
                                            order_key)
        found, segments = nested.grouping, nested.segments
        segment_of_group = nested.segment_of_group
        run_groups = nested.run_order
        saved = nested.saved_tokens
    else:
        found = grouping.group_prompts(tree, grouping_method, align_to_pages)
        run_groups = ordering.order_groups(found, decode, lengths, order_key)  # [G] old ids
        # One segment per shared prefix, numbered in run order.
        shared = run_groups[found.prefix_len[run_groups] > 0]
        segment_of_group = np.full(found.num_groups, -1, dtype=np.int64)
        segment_of_group[shared] = np.arange(len(shared))
        ends = found.prefix_len[shared].astype(np.int64)
        segments = SegmentTree(np.full(len(shared), -1, dtype=np.int64),
                               np.zeros(len(shared), dtype=np.int64), ends,
                               np.ones(len(shared), dtype=np.int64))
        saved = found.saved_tokens
    run_members = ordering.order_requests(found, decode, lengths, order_key).tolist()
    offsets = found.offsets.tolist()
    request_order = tuple(
        tuple(run_members[offsets[g] : offsets[g + 1]]) for g in run_groups.tolist()
    )
    new_id = np.empty(found.num_groups, dtype=np.int64)
    new_id[run_groups] = np.arange(found.num_groups)
    group_of_request = np.empty(len(prompts), dtype=np.int64)
    group_of_request[found.members] = np.repeat(new_id, found.sizes)
    prefix_len_of_request = np.empty(len(prompts), dtype=np.int64)
    prefix_len_of_request[found.members] = np.repeat(found.prefix_len, found.sizes)
    logical = prompts.total_tokens
    groups = grouping.prefix_groups(prompts, found, run_groups)
    chains = [_chain(segments, int(segment_of_group[g])) for g in run_groups.tolist()]
    groups = tuple(dataclasses.replace(g, chain=c) for g, c in zip(groups, chains))
    return Plan(
        prompts=prompts,
        groups=groups,
        request_order=request_order,
        group_of_request=group_of_request,
        prefix_len_of_request=prefix_len_of_request,
        logical_prefill_tokens=logical,
        planned_prefill_tokens=logical - saved,
        optimal_saving_ratio=tree.optimal_saving_ratio,
        plan_s=time.perf_counter() - start,
        segments=segments,
    )


def new_prefix_lens(groups: Sequence[PrefixGroup]) -> np.ndarray:
    """[G] prefix tokens each group is the first (in this order) to need: the segments of its
    chain that no earlier group's chain holds. They sum to the groups' shared tokens."""
    seen: set[int] = set()
    out = np.zeros(len(groups), dtype=np.int64)
    for g, group in enumerate(groups):
        start = 0
        for seg, end in group.chain:
            if seg not in seen:
                seen.add(seg)
                out[g] += end - start
            start = end
    return out


def _chain(segments: SegmentTree, segment: int) -> tuple[tuple[int, int], ...]:
    return tuple((k, int(segments.end[k])) for k in segments.chain(segment))
