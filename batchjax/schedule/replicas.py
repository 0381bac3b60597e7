"""Whole prefix groups onto data-parallel replicas: longest processing time first (LPT).

A group never straddles two replicas (its shared prefix is computed once, on one of them), so
data parallelism is a partition of the plan's groups. LPT takes the groups from the dearest
down and gives each to the replica with the least work so far; its busiest replica carries at
most `4/3 - 1/(3 D)` times the best possible partition's, and at most `mean + largest group`.
Within a replica the groups keep the order they were given in (the plan's execution order).
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
