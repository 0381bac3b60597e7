"""The whole planning pipeline: identify prefixes -> group -> order, as one frozen Plan."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from batchjax.schedule import grouping, ordering
from batchjax.schedule.grouping import PrefixGroup
from batchjax.schedule.prefix_tree import TokenBatch, identify_prefixes
from batchjax.schedule.step_plan import SchedRequest


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
) -> Plan:
    """Plans SchedRequests (token-id prompts with their decode limits)."""
    start = time.perf_counter()
    prompts = TokenBatch.from_sequences([r.prompt_token_ids for r in requests])
    return build_plan_from_tokens(
        prompts,
        ordering.decode_estimates(requests),
        grouping_method,
        align_to_pages,
        order_key,
        _started=start,
    )


def build_plan_from_tokens(
    prompts: TokenBatch,
    decode: np.ndarray,
    grouping_method: str = "batchllm",
    align_to_pages: int | None = None,
    order_key: ordering.OrderKey = ordering.decode_first_key,
    _started: float | None = None,
) -> Plan:
    """Plans prompts held as one TokenBatch; decode: [N] expected output lengths.

    The entry point for very large batches, where a Python object per prompt is too dear.
    """
    start = time.perf_counter() if _started is None else _started
    tree = identify_prefixes(prompts)
    found = grouping.group_prompts(tree, grouping_method, align_to_pages)
    lengths = prompts.lengths
    decode = np.asarray(decode, dtype=np.float64)
    run_groups = ordering.order_groups(found, decode, lengths, order_key)  # [G] old ids
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
    return Plan(
        prompts=prompts,
        groups=grouping.prefix_groups(prompts, found, run_groups),
        request_order=request_order,
        group_of_request=group_of_request,
        prefix_len_of_request=prefix_len_of_request,
        logical_prefill_tokens=logical,
        planned_prefill_tokens=logical - found.saved_tokens,
        optimal_saving_ratio=tree.optimal_saving_ratio,
        plan_s=time.perf_counter() - start,
    )
