"""Decode-first ordering of groups and of requests inside a group."""

import numpy as np

from batchjax.schedule.grouping import Grouping
from batchjax.schedule.ordering import order_groups, order_requests


def _grouping(groups):
    """groups: (prefix_len, request ids) per group."""
    sizes = [len(ids) for _, ids in groups]
    return Grouping(
        members=np.array([r for _, ids in groups for r in ids], dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        prefix_len=np.array([p for p, _ in groups], dtype=np.int64),
    )


def test_groups_with_fewer_prefill_tokens_run_first_under_one_decode_estimate():
    groups = _grouping([(100, [0, 1]), (10, [2, 3]), (0, [4])])
    lens = np.array([110, 120, 20, 20, 5])
    # physical prefill: 100+10+20=130, 10+10+10=30, 5 (no shared prefix)
    assert order_groups(groups, np.full(5, 64.0), lens).tolist() == [2, 1, 0]


def test_larger_decode_ratio_runs_first_and_ties_keep_input_order():
    groups = _grouping([(0, [0]), (0, [1]), (0, [2])])
    lens = np.array([10, 10, 10])
    assert order_groups(groups, np.array([5.0, 50.0, 5.0]), lens).tolist() == [1, 0, 2]


def test_requests_in_a_group_order_by_own_ratio_then_id():
    groups = _grouping([(8, [0, 1, 2, 3]), (0, [4])])
    lens = np.array([10, 18, 10, 9, 3])  # suffixes 2, 10, 2, 1 in the first group
    assert order_requests(groups, np.full(5, 10.0), lens).tolist() == [3, 0, 2, 1, 4]


def test_the_key_can_be_swapped():
    groups = _grouping([(0, [0]), (0, [1])])
    lens = np.array([5, 50])
    longest_first = lambda decode, prefill: prefill  # noqa: E731
    assert order_groups(groups, np.ones(2), lens, longest_first).tolist() == [1, 0]
