"""Single-level grouping: coverage, reconstruction, alignment, and how much each method saves."""

import functools
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


def _best_saving_over_the_token_trie(prompts):
    """The exact optimum by its definition on the uncompressed trie: at every position, either
    no group, or a group there that every longer prompt below (not in a deeper group) joins."""
    prompts = [tuple(p) for p in prompts]

    @functools.cache
    def best(prefix, above):
        d = len(prefix)
        ending = sum(p == prefix for p in prompts)
        children = sorted({p[d] for p in prompts if len(p) > d and p[:d] == prefix})
        below = lambda a: sum(best(prefix + (c,), a) for c in children)  # noqa: E731
        no_group = ending * above + below(above)
        return max(no_group, ending * above + below(d) - d) if d else no_group

    return best((), 0)


larger_prompts = st.lists(
    st.lists(st.integers(0, 2), min_size=1, max_size=14), min_size=1, max_size=40
)


@settings(max_examples=100, deadline=None)
@given(st.one_of(larger_prompts, templated_prompts()))
def test_exact_grouping_matches_the_trie_definition_on_larger_trees(prompts):
    tree = identify_prefixes(prompts)
    assert saved_tokens(group(tree, "exact")) == _best_saving_over_the_token_trie(prompts)


@settings(max_examples=200, deadline=None)
@given(st.one_of(tiny_prompts, larger_prompts, templated_prompts()))
def test_batchllm_saves_within_one_percent_of_the_best_single_level_grouping(prompts):
    tree = identify_prefixes(prompts)
    best = saved_tokens(group(tree, "exact"))
    assert saved_tokens(group(tree, "batchllm")) >= 0.99 * best
    for method in GROUPING_METHODS:
        assert saved_tokens(group(tree, method)) <= best


def test_enlarging_beats_first_level_grouping():
    # One short head under which two families share long bodies: first-level grouping shares
    # only the head; enlarging gives each family its body.
    head = [1, 2]
    families = [[10 + f] * 40 for f in range(2)]
    prompts = [head + families[f] + [100 + i] for f in range(2) for i in range(4)]
    tree = identify_prefixes(prompts)
    assert saved_tokens(group(tree, "first_level")) == 7 * 2
    for method in ("paper", "batchllm"):
        enlarged = group(tree, method)
        assert saved_tokens(enlarged) == 2 * 3 * 42
        assert sorted(g.prefix_len for g in enlarged) == [42, 42]


def test_the_papers_rule_falls_short_where_the_exact_grouping_does_not():
    # [2] ends at the first-level node, so a group there costs every member a token; the paper's
    # rule then shares less than the one group of the three longer prompts under [2].
    prompts = [[2, 1, 1], [2, 2, 2], [1, 1], [2, 2], [2]]
    tree = identify_prefixes(prompts)
    assert saved_tokens(group(tree, "paper")) == 1
    assert saved_tokens(group(tree, "batchllm")) == saved_tokens(group(tree, "exact")) == 2


def test_identical_prompts_keep_one_token_each():
    groups = group(identify_prefixes([[5, 6, 7]] * 3), "batchllm")
    assert len(groups) == 1 and groups[0].prefix_token_ids == (5, 6)


def test_group_prefixes_are_views_of_the_prompt_tokens():
    # A million-request plan must not hold a Python int per prefix token.
    w = workloads.microbenchmark(16, 4, 1, 4, 64)
    tree = identify_prefixes(w.prompts)
    for g in group(tree, "batchllm"):
        assert g.prefix_len == 16
        assert np.shares_memory(g.prefix_tokens, w.prompts.tokens)
        assert g.prefix_token_ids == tuple(w.prompts[g.request_ids[0]][:16].tolist())


def test_batchllm_reaches_optimal_saving_on_the_papers_microbenchmark():
    w = workloads.microbenchmark(
        prefix_len=2000, distinct_len=200, output_len=100, sharing_degree=16,
        num_requests=6400, vocab_size=1 << 20,
    )
    tree = identify_prefixes(w.prompts)
    saving_ratio = saved_tokens(group(tree, "batchllm")) / tree.logical_prefill_tokens
    assert saving_ratio >= 0.99 * tree.optimal_saving_ratio
    assert saving_ratio == pytest.approx(1 - (400 * 2000 + 6400 * 200) / (6400 * 2200))
