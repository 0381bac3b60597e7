"""Whole prefix groups onto data-parallel replicas: longest processing time first (LPT).

A group never straddles two replicas (its shared prefix is computed once, on one of them), so
data parallelism is a partition of the plan's groups. LPT takes the groups from the dearest
down and gives each to the replica with the least work so far; its busiest replica carries at
most `4/3 - 1/(3 D)` times the best possible partition's, and at most `mean + largest group`.
Within a replica the groups keep the order they were given in (the plan's execution order).

The baselines plan no groups: they split the job's requests into contiguous shares of about
equal estimated work (`baseline_shares`), the one split the engine runs and the simulator
replays.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


def assign_groups(costs: Sequence[float], num_replicas: int) -> list[list[int]]:
    """Group indices per replica, each list ascending (so plan order is kept).

    `costs[g]` is group g's estimated work (any non-negative unit). Deterministic: groups of
    equal cost are taken in index order, and among equally loaded replicas the lowest index
    wins. With one replica every group stays on it, in order.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    cost = np.asarray(costs, dtype=np.float64).reshape(-1)
    if cost.size and (not np.all(np.isfinite(cost)) or cost.min() < 0):
        raise ValueError("group costs must be finite and non-negative")
    if num_replicas == 1:
        return [list(range(cost.size))]
    order = np.argsort(-cost, kind="stable")  # dearest first; ties by index
    loads = [(0.0, r) for r in range(num_replicas)]  # a heap: least loaded, then lowest index
    owner = np.empty(cost.size, dtype=np.int64)
    values = cost.tolist()
    for g in order.tolist():
        load, r = heapq.heappop(loads)
        owner[g] = r
        heapq.heappush(loads, (load + values[g], r))
    return [np.flatnonzero(owner == r).tolist() for r in range(num_replicas)]


def assign_subtrees(costs: Sequence[float], subtree_of_group: Sequence[int],
                    num_replicas: int) -> list[list[int]]:
    """`assign_groups` over whole subtrees: groups with the same `subtree_of_group` key
    (multi-level sharing: the same top-level segment) go to one replica, weighed by their
    summed cost. Group indices per replica, each list ascending."""
    keys = np.asarray(subtree_of_group, dtype=np.int64).reshape(-1)
    cost = np.asarray(costs, dtype=np.float64).reshape(-1)
    if keys.shape != cost.shape:
        raise ValueError("one subtree key per group cost")
    # Subtrees numbered by their first group, so ties keep plan order.
    _, first, unit_of_group = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    unit_of_group = rank[unit_of_group.reshape(-1)]
    unit_cost = np.bincount(unit_of_group, weights=cost, minlength=len(first))
    per_replica = assign_groups(unit_cost, num_replicas)
    owner = np.empty(len(first), dtype=np.int64)
    for r, units in enumerate(per_replica):
        owner[units] = r
    return [np.flatnonzero(owner[unit_of_group] == r).tolist() for r in range(num_replicas)]


def contiguous_shares(costs: Sequence[float], num_replicas: int) -> list[list[int]]:
    """Indices 0..N-1 cut into `num_replicas` runs of about equal total cost, in order
    (neighbouring requests, which often share a prefix, stay together)."""
    total = sum(costs)
    shares: list[list[int]] = [[] for _ in range(num_replicas)]
    acc = 0.0
    for i, c in enumerate(costs):
        r = min(num_replicas - 1, int((acc + c / 2) * num_replicas / total)) if total else 0
        shares[r].append(i)
        acc += c
    return shares


def baseline_shares(prompt_lens: Sequence[int], max_tokens: Sequence[int],
                    num_replicas: int) -> list[list[int]]:
    """A baseline policy's requests per replica: contiguous runs in input order, weighed by
    each request's prompt plus its decode limit (the tokens it may run through the model)."""
    if len(prompt_lens) != len(max_tokens):
        raise ValueError("one max_tokens per prompt length")
    return contiguous_shares([int(p) + int(m) for p, m in zip(prompt_lens, max_tokens)],
                             num_replicas)
