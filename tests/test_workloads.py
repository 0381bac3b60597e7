"""Synthetic workloads: shapes, determinism and the JSONL round trip."""

import numpy as np

from batchjax import workloads
from batchjax.schedule.step_plan import SchedRequest


def test_microbenchmark_groups_share_exactly_their_prefix():
    w = workloads.microbenchmark(
        prefix_len=20, distinct_len=5, output_len=7, sharing_degree=4, num_requests=32
    )
    assert len(w) == 32
    assert np.all(w.prompts.lengths == 25)
    assert np.all(w.output_lens == 7) and np.all(w.max_tokens == 7)
    prefixes = {tuple(p[:20].tolist()) for p in w.prompts}
    assert len(prefixes) == 8
    counts = [sum(tuple(p[:20].tolist()) == prefix for p in w.prompts) for prefix in prefixes]
    assert counts == [4] * 8


def test_microbenchmark_is_shuffled_unless_asked_not_to():
    shuffled = workloads.microbenchmark(8, 2, 1, 4, 64, shuffle=True)
    ordered = workloads.microbenchmark(8, 2, 1, 4, 64, shuffle=False)
    ordered_heads = [tuple(p[:8].tolist()) for p in ordered.prompts]
    assert all(ordered_heads[i] == ordered_heads[i - i % 4] for i in range(64))
    shuffled_heads = [tuple(p[:8].tolist()) for p in shuffled.prompts]
    assert any(shuffled_heads[i] != shuffled_heads[i - i % 4] for i in range(64))


def test_workloads_are_deterministic_per_seed():
    a = workloads.industry_like(num_requests=300, seed=3)
    b = workloads.industry_like(num_requests=300, seed=3)
    c = workloads.industry_like(num_requests=300, seed=4)
    assert np.array_equal(a.prompts.tokens, b.prompts.tokens)
    assert np.array_equal(a.output_lens, b.output_lens)
    assert not np.array_equal(a.prompts.offsets, c.prompts.offsets)


def test_industry_like_matches_the_papers_shape():
    w = workloads.industry_like(num_requests=2000, seed=0)
    assert len(w) == 2000
    lengths = w.prompts.lengths
    assert 1300 < lengths.mean() < 1900  # prefix ~1,570 plus distinct ~30
    assert np.all(w.output_lens >= 1) and np.all(w.output_lens <= w.max_tokens)
    # Requests sharing their first 300 tokens form groups of about three on average.
    heads: dict[tuple[int, ...], int] = {}
    for p in w.prompts:
        key = tuple(p[:300].tolist())
        heads[key] = heads.get(key, 0) + 1
    degrees = np.array(list(heads.values()))
    assert np.any(degrees == 1) and degrees.max() > 5
    assert 2.0 < degrees.mean() < 4.0


def test_no_sharing_prompts_differ_from_the_first_tokens():
    w = workloads.no_sharing(prompt_len=50, output_len=3, num_requests=100)
    assert len({tuple(p[:3].tolist()) for p in w.prompts}) == 100


def test_jsonl_round_trip(tmp_path):
    w = workloads.industry_like(num_requests=50, seed=1)
    path = tmp_path / "mix.jsonl"
    workloads.write_jsonl(w, path)
    back = workloads.read_jsonl(path)
    assert back.name == "mix"
    assert np.array_equal(back.prompts.tokens, w.prompts.tokens)
    assert np.array_equal(back.prompts.offsets, w.prompts.offsets)
    assert np.array_equal(back.output_lens, w.output_lens)
    assert np.array_equal(back.max_tokens, w.max_tokens)


def test_to_sched_requests_carries_prompt_and_limit():
    w = workloads.no_sharing(prompt_len=4, output_len=9, num_requests=3)
    requests = w.to_sched_requests()
    assert requests[1] == SchedRequest(tuple(w.prompts[1].tolist()), 9)
