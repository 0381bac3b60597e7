"""Decode-first ordering of groups and of requests inside a group."""

import numpy as np

from batchjax.schedule.grouping import PrefixGroup
from batchjax.schedule.ordering import order_groups, order_requests


def _group(gid, prefix_len, ids):
    return PrefixGroup(gid, tuple(range(prefix_len)), tuple(ids))


def test_groups_with_fewer_prefill_tokens_run_first_under_one_decode_estimate():
    groups = [_group(0, 100, [0, 1]), _group(1, 10, [2, 3]), _group(2, 50, [4])]
    lens = np.array([110, 120, 20, 20, 5])
    ordered = order_groups(groups, np.full(5, 64.0), lens)
    # physical prefill: 100+10+20=130, 10+10+10=30, 5 (no shared prefix)
    assert [g.group_id for g in ordered] == [2, 1, 0]


def test_larger_decode_ratio_runs_first_and_ties_keep_input_order():
    groups = [_group(0, 0, [0]), _group(1, 0, [1]), _group(2, 0, [2])]
    lens = np.array([10, 10, 10])
    ordered = order_groups(groups, np.array([5.0, 50.0, 5.0]), lens)
    assert [g.group_id for g in ordered] == [1, 0, 2]


def test_requests_in_a_group_order_by_own_ratio_then_id():
    g = _group(0, 8, [0, 1, 2, 3])
    lens = np.array([10, 18, 10, 9])  # suffixes 2, 10, 2, 1
    assert order_requests(g, np.full(4, 10.0), lens) == (3, 0, 2, 1)


def test_the_key_can_be_swapped():
    groups = [_group(0, 0, [0]), _group(1, 0, [1])]
    lens = np.array([5, 50])
    longest_first = lambda decode, prefill: prefill  # noqa: E731
    assert [g.group_id for g in order_groups(groups, np.ones(2), lens, longest_first)] == [1, 0]
