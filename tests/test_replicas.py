"""Whole prefix groups onto data-parallel replicas, longest processing time first."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from batchjax.schedule.replicas import assign_groups, baseline_shares


def _loads(costs, shares) -> list[float]:
    return [float(sum(costs[g] for g in share)) for share in shares]


def _best_makespan(costs, num_replicas: int) -> float:
    """The optimal partition's busiest replica, by trying every assignment (small inputs)."""
    best = float("inf")
    for owners in itertools.product(range(num_replicas), repeat=len(costs)):
        loads = np.zeros(num_replicas)
        np.add.at(loads, list(owners), costs)
        best = min(best, float(loads.max()))
    return best


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 5, 8])
def test_every_group_goes_to_exactly_one_replica_in_plan_order(num_replicas):
    costs = np.random.default_rng(num_replicas).lognormal(0.0, 1.0, size=101)
    shares = assign_groups(costs.tolist(), num_replicas)
    assert len(shares) == num_replicas
    assert sorted(g for share in shares for g in share) == list(range(len(costs)))
    for share in shares:
        assert share == sorted(share)  # a replica runs its groups in plan order


def test_one_replica_keeps_the_plan_order():
    assert assign_groups([5.0, 1.0, 3.0, 3.0], 1) == [[0, 1, 2, 3]]
    assert assign_groups([], 1) == [[]]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("num_replicas", [2, 3])
def test_lpt_is_within_its_bound_of_the_best_partition(seed, num_replicas):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 50, size=7).astype(float)
    busiest = max(_loads(costs, assign_groups(costs, num_replicas)))
    best = _best_makespan(costs, num_replicas)
    assert busiest <= (4 / 3 - 1 / (3 * num_replicas)) * best + 1e-9
    # And the greedy bound: no more than the mean plus (1 - 1/D) of the largest group.
    assert busiest <= costs.sum() / num_replicas + (1 - 1 / num_replicas) * costs.max() + 1e-9


def test_longest_first_onto_the_least_loaded_ties_by_index():
    # 8 to replica 0, 7 to 1, 6 to 1 (7 < 8), 5 to 0 (8 < 13), 4 to 0 (13 = 13: lower index).
    assert assign_groups([5, 8, 4, 7, 6], 2) == [[0, 1, 2], [3, 4]]
    # Equal costs deal out round robin in index order.
    assert assign_groups([1.0] * 7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert assign_groups([2.0, 2.0], 4) == [[0], [1], [], []]  # more replicas than groups


def test_deterministic_and_balanced_on_many_groups():
    costs = np.random.default_rng(7).exponential(1.0, size=5000)
    first = assign_groups(costs, 8)
    assert first == assign_groups(list(costs), 8)
    loads = _loads(costs, first)
    assert max(loads) / np.mean(loads) < 1.001


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="num_replicas"):
        assign_groups([1.0], 0)
    with pytest.raises(ValueError, match="non-negative"):
        assign_groups([1.0, -2.0], 2)
    with pytest.raises(ValueError, match="finite"):
        assign_groups([float("nan")], 2)


def test_the_module_needs_no_jax():
    code = ("import sys; import batchjax.schedule.replicas; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_baseline_shares_weigh_each_request_by_prompt_and_decode_limit():
    # 40 + 10 + 10 + 10: the first request alone is over half the job.
    assert baseline_shares([10, 10, 10, 10], [30, 0, 0, 0], 2) == [[0], [1, 2, 3]]
    assert baseline_shares([10, 10, 10, 10], [0, 0, 0, 0], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="one max_tokens per prompt"):
        baseline_shares([10, 10], [1], 2)
