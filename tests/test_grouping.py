"""Single-level grouping: coverage, reconstruction, alignment, and how much each method saves."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax import workloads
from batchjax.schedule.grouping import GROUPING_METHODS, group, saved_tokens
from batchjax.schedule.prefix_tree import identify_prefixes

# Nested, overlapping, one-token and identical prompts are all common over a 3-token alphabet.
tiny_prompts = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=1, max_size=7)


@st.composite
def templated_prompts(draw):
    """Prompts built like real batches: a few heads, shared bodies, short own tails."""
    token = st.integers(0, 40)
    heads = draw(st.lists(st.lists(token, min_size=1, max_size=25), min_size=1, max_size=3))
    bodies = draw(st.lists(st.lists(token, min_size=1, max_size=50), min_size=1, max_size=5))
    picks = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(heads) - 1),
                st.integers(-1, len(bodies) - 1),  # -1: no body
                st.lists(token, max_size=5),
            ),
            min_size=1,
            max_size=30,
        )
    )
    return [heads[h] + (bodies[b] if b >= 0 else []) + tail for h, b, tail in picks]


def _check_valid(prompts, groups, page_size=None):
    ids = sorted(r for g in groups for r in g.request_ids)
    assert ids == list(range(len(prompts)))
    assert [g.group_id for g in groups] == list(range(len(groups)))
    for g in groups:
        assert list(g.request_ids) == sorted(g.request_ids)
        if len(g.request_ids) == 1:
            assert g.prefix_len == 0
        if page_size:
            assert g.prefix_len % page_size == 0
        for r in g.request_ids:
            prompt = tuple(prompts[r])
            suffix = prompt[g.prefix_len :]
            assert g.prefix_token_ids + suffix == prompt
            assert len(suffix) >= 1


@settings(max_examples=100, deadline=None)
@given(st.one_of(tiny_prompts, templated_prompts()), st.sampled_from(GROUPING_METHODS))
def test_every_request_in_one_group_and_prefix_plus_suffix_is_the_prompt(prompts, method):
    _check_valid(prompts, group(identify_prefixes(prompts), method))


@settings(max_examples=60, deadline=None)
@given(templated_prompts(), st.sampled_from(GROUPING_METHODS), st.integers(1, 16))
def test_aligned_prefixes_are_whole_pages(prompts, method, page_size):
    groups = group(identify_prefixes(prompts), method, align_to_pages=page_size)
    _check_valid(prompts, groups, page_size)


@settings(max_examples=40, deadline=None)
@given(templated_prompts(), st.sampled_from(GROUPING_METHODS))
def test_grouping_is_deterministic(prompts, method):
    assert group(identify_prefixes(prompts), method) == group(identify_prefixes(prompts), method)


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def _best_saving_by_brute_force(prompts):
    def saving(members):
        if len(members) < 2:
            return 0
        rows = [prompts[i] for i in members]
        common = len(list(itertools.takewhile(lambda col: len(set(col)) == 1, zip(*rows))))
        return (len(members) - 1) * min(common, min(map(len, rows)) - 1)

    return max(sum(map(saving, part)) for part in _set_partitions(list(range(len(prompts)))))


@settings(max_examples=150, deadline=None)
@given(tiny_prompts)
def test_exact_grouping_matches_brute_force_over_all_partitions(prompts):
    tree = identify_prefixes(prompts)
    assert saved_tokens(group(tree, "exact")) == _best_saving_by_brute_force(prompts)


@settings(max_examples=150, deadline=None)
@given(tiny_prompts)
def test_no_method_saves_more_than_exact(prompts):
    tree = identify_prefixes(prompts)
    best = saved_tokens(group(tree, "exact"))
    assert saved_tokens(group(tree, "batchllm")) <= best
    assert saved_tokens(group(tree, "first_level")) <= best


def test_batchllm_saves_within_one_percent_of_exact_on_templated_batches():
    rng = np.random.default_rng(0)
    batchllm_total = exact_total = 0
    for _ in range(300):
        heads = [rng.integers(0, 40, rng.integers(1, 26)).tolist() for _ in range(rng.integers(1, 4))]
        bodies = [rng.integers(0, 40, rng.integers(1, 51)).tolist() for _ in range(rng.integers(1, 6))]
        prompts = []
        for _ in range(rng.integers(2, 31)):
            body = bodies[rng.integers(len(bodies))] if rng.random() < 0.8 else []
            prompts.append(
                heads[rng.integers(len(heads))] + body + rng.integers(0, 40, rng.integers(0, 6)).tolist()
            )
        tree = identify_prefixes(prompts)
        batchllm_total += saved_tokens(group(tree, "batchllm"))
        exact_total += saved_tokens(group(tree, "exact"))
    assert batchllm_total >= 0.99 * exact_total


def test_enlarging_beats_first_level_grouping():
    # One short head under which two families share long bodies: first-level grouping shares
    # only the head; enlarging gives each family its body.
    head = [1, 2]
    families = [[10 + f] * 40 for f in range(2)]
    prompts = [head + families[f] + [100 + i] for f in range(2) for i in range(4)]
    tree = identify_prefixes(prompts)
    first_level = saved_tokens(group(tree, "first_level"))
    enlarged = group(tree, "batchllm")
    assert first_level == 7 * 2
    assert saved_tokens(enlarged) == 2 * 3 * 42
    assert sorted(g.prefix_len for g in enlarged) == [42, 42]


def test_identical_prompts_keep_one_token_each():
    groups = group(identify_prefixes([[5, 6, 7]] * 3), "batchllm")
    assert len(groups) == 1 and groups[0].prefix_token_ids == (5, 6)


def test_batchllm_reaches_optimal_saving_on_the_papers_microbenchmark():
    w = workloads.microbenchmark(
        prefix_len=2000, distinct_len=200, output_len=100, sharing_degree=16,
        num_requests=6400, vocab_size=1 << 20,
    )
    tree = identify_prefixes(w.prompts)
    saving_ratio = saved_tokens(group(tree, "batchllm")) / tree.logical_prefill_tokens
    assert saving_ratio >= 0.99 * tree.optimal_saving_ratio
    assert saving_ratio == pytest.approx(1 - (400 * 2000 + 6400 * 200) / (6400 * 2200))
