"""The radix tree over all prompts, checked against brute-force prefix sets."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax.schedule.prefix_tree import TokenBatch, identify_prefixes, sort_prompts

# Small alphabets make nested, overlapping and identical prompts common.
prompt_lists = st.lists(
    st.lists(st.integers(0, 2), min_size=1, max_size=10), min_size=1, max_size=25
)


@settings(max_examples=100, deadline=None)
@given(prompt_lists, st.integers(1, 5))
def test_sort_is_lexicographic_with_neighbour_lcps(prompts, window):
    order, lcp = sort_prompts(TokenBatch.from_sequences(prompts), window=window, round_tokens=0)
    assert [prompts[i] for i in order] == sorted(prompts)
    for i in range(1, len(prompts)):
        a, b = prompts[order[i - 1]], prompts[order[i]]
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        assert lcp[i] == common


@settings(max_examples=100, deadline=None)
@given(prompt_lists)
def test_tree_nodes_hold_exactly_the_prompts_that_start_with_their_path(prompts):
    tree = identify_prefixes(prompts)
    prefixes = {tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)}
    assert tree.num_trie_nodes == len(prefixes)
    assert tree.num_below(0) == len(prompts)
    for v in range(tree.num_nodes):
        path = tuple(tree.path_token_ids(v).tolist())
        below = set(tree.prompts_below(v).tolist())
        assert below == {i for i, p in enumerate(prompts) if tuple(p[: len(path)]) == path}
        assert tree.terminals[v] == sum(len(prompts[i]) == len(path) for i in below)
        kids = tree.children_of(v)
        assert tree.terminals[v] + sum(tree.num_below(c) for c in kids) == len(below)
        if v:
            assert tree.parent[v] < v
            edge = tuple(tree.edge_token_ids(v).tolist())
            assert tuple(tree.path_token_ids(tree.parent[v]).tolist()) + edge == path
            # A radix tree has no pass-through nodes.
            assert tree.terminals[v] > 0 or len(kids) >= 2
    for i, p in enumerate(prompts):
        assert tree.depth[tree.node_of_prompt[i]] == len(p)


def test_optimal_saving_ratio_of_a_shared_prefix():
    prompts = [[7] * 10 + [i] for i in range(4)]
    tree = identify_prefixes(prompts)
    assert tree.num_trie_nodes == 10 + 4
    assert tree.optimal_saving_ratio == 1 - 14 / 44


def test_padded_rows_and_flat_batches_build_the_same_tree():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, size=(40, 12), dtype=np.int32)
    lengths = rng.integers(1, 13, size=40)
    padded = TokenBatch.from_padded(rows, lengths)
    listed = [row[:n] for row, n in zip(rows, lengths)]
    a, b = identify_prefixes(padded), identify_prefixes(listed)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.depth, b.depth)
    assert np.array_equal(a.parent, b.parent)


def test_empty_prompt_is_rejected():
    try:
        identify_prefixes([[1], []])
    except ValueError:
        return
    raise AssertionError("an empty prompt was accepted")
