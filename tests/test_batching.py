"""Batchers of every policy, driven by a checking executor over random workloads.

The executor (`batchjax.schedule.checking.CheckingExecutor`) keeps a model of the KV pages and
verifies every step: a wrong token, a wrong position, a missing or stale context page, or a
page overwritten by another sequence fails it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax.schedule.batching import (BatchLLMBatcher, BudgetTooSmall, Sequence_,
                                       check_kv_budget, decode_chunks, make_chunk, pages_for)
from batchjax.schedule.checking import (CheckingExecutor, Replay, check_invariants,  # noqa: F401
                                        random_workload, run_checked, tight_budgets)
from batchjax.schedule.plan import build_plan
from batchjax.schedule.policies import POLICIES, make_batcher
from batchjax.schedule.step_plan import Budgets, SchedRequest


# -- workloads ----------------------------------------------------------------------------


@st.composite
def workloads(draw) -> tuple[list[SchedRequest], list[int]]:
    """Prompts built from a few nested/overlapping stems over a tiny vocabulary, so prompts
    share prefixes of every shape: nested, overlapping, identical, one token, none at all."""
    vocab = st.integers(0, 3)
    stems = draw(st.lists(st.lists(vocab, min_size=0, max_size=20), min_size=1, max_size=4))
    # Nesting: a stem may extend another one.
    for k in range(1, len(stems)):
        if draw(st.booleans()):
            stems[k] = stems[draw(st.integers(0, k - 1))] + stems[k]
    n = draw(st.integers(1, 14))
    requests, output_lens = [], []
    for _ in range(n):
        stem = stems[draw(st.integers(0, len(stems) - 1))]
        tail = draw(st.lists(vocab, min_size=0 if stem else 1, max_size=12))
        max_tokens = draw(st.integers(1, 8))
        output_lens.append(draw(st.integers(1, max_tokens)))
        # An estimate below the true length makes batchllm under-reserve and preempt.
        estimate = draw(st.none() | st.integers(0, max_tokens))
        requests.append(SchedRequest(tuple(stem + tail), max_tokens, estimate))
    return requests, output_lens


def replay(policy: str, requests, output_lens, budgets: Budgets, overlap=False) -> Replay:
    return run_checked(make_batcher(policy, requests, budgets), requests, output_lens, budgets,
                       overlap)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=60, deadline=None)
@given(work=workloads(), page_size=st.sampled_from([1, 2, 4]), slack=st.integers(0, 6))
def test_every_request_completes_once_with_its_output_and_correct_kv(
    policy, overlap, work, page_size, slack
):
    """With overlap, the batcher plans on placeholders and learns of early finishes a step
    late, also for requests it preempted meanwhile."""
    requests, output_lens = work
    budgets = tight_budgets(requests, page_size, slack)
    result = replay(policy, requests, output_lens, budgets, overlap)
    assert all(count == 1 for count in result.finish_count.values())
    assert [len(result.generated[i]) for i in range(len(requests))] == list(output_lens)
    m = result.metrics
    assert m["output_tokens"] == sum(output_lens)
    assert m["num_steps"] == len(result.steps)
    assert m["peak_kv_pages"] <= budgets.kv_budget_pages


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=15, deadline=None)
@given(work=workloads())
def test_same_input_gives_the_same_schedule(policy, work):
    requests, output_lens = work
    budgets = tight_budgets(requests, 2, 3)
    first = replay(policy, requests, output_lens, budgets)
    second = replay(policy, requests, output_lens, budgets)
    assert first.steps == second.steps


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=40, deadline=None)
@given(work=workloads(), page_size=st.sampled_from([1, 2, 4]), slack=st.integers(0, 6))
def test_invariants_hold_over_generated_workloads(policy, overlap, work, page_size, slack):
    """The campaign's invariants (experiments/faults.py runs 1,000 workloads per policy):
    pool empty at the end, prefill at least the trie's optimum, the same plan on a rerun."""
    requests, output_lens = work
    budgets = tight_budgets(requests, page_size, slack)
    assert check_invariants(policy, requests, output_lens, budgets, overlap) == []


def test_the_invariant_checks_catch_a_broken_batcher(monkeypatch):
    """check_invariants is not vacuous: a pool that never frees its pages is reported."""
    from batchjax.schedule import pages

    requests, output_lens = random_workload(np.random.default_rng(4))
    budgets = Budgets(max_tokens_per_step=16, kv_budget_pages=400, page_size=2)
    assert check_invariants("batchllm", requests, output_lens, budgets) == []
    monkeypatch.setattr(pages.PagePool, "release", lambda self, pages: None)
    assert any("still held at the end" in b
               for b in check_invariants("batchllm", requests, output_lens, budgets))


def _micro(prefix_len: int, distinct_len: int, degree: int, num_groups: int, output_len: int,
           estimate: int | None = None):
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(num_groups):
        prefix = rng.integers(0, 1000, prefix_len).tolist()
        for _ in range(degree):
            distinct = rng.integers(0, 1000, distinct_len).tolist()
            requests.append(SchedRequest(tuple(prefix + distinct), output_len, estimate))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order], [output_len] * len(requests)


def test_batchllm_computes_exactly_the_planned_tokens_without_preemption():
    requests, output_lens = _micro(40, 5, 4, 6, 3)
    budgets = Budgets(max_tokens_per_step=32, kv_budget_pages=40, page_size=4)
    plan = build_plan(requests)
    result = run_checked(make_batcher("batchllm", requests, budgets, plan=plan),
                         requests, output_lens, budgets)
    m = result.metrics
    assert m["num_preemptions"] == 0
    assert m["computed_prefill_tokens"] == plan.planned_prefill_tokens
    assert m["saving_ratio"] == pytest.approx(plan.saving_ratio)
    assert m["num_groups"] == plan.num_groups


def test_shared_prefix_is_computed_once_and_attended_by_its_whole_group():
    requests, output_lens = _micro(12, 2, 3, 1, 2)
    budgets = Budgets(max_tokens_per_step=64, kv_budget_pages=64, page_size=4)
    result = run_checked(make_batcher("batchllm", requests, budgets), requests, output_lens,
                         budgets)
    prefix_chunks = [c for s in result.steps for c in s.chunks if c.seq_id < 0]
    assert sum(c.num_tokens for c in prefix_chunks) == 12
    attending = {c.seq_id for s in result.steps for c in s.chunks if c.prefix_group is not None}
    assert attending == {0, 1, 2}


def test_tight_budget_preempts_and_still_completes_everything():
    # Reservations assume 1 output token; the truth is 12, so decoding outgrows them.
    requests, output_lens = _micro(8, 4, 4, 3, 12, estimate=1)
    budgets = Budgets(max_tokens_per_step=24, kv_budget_pages=14, page_size=2)
    result = run_checked(make_batcher("batchllm", requests, budgets), requests, output_lens,
                         budgets)
    m = result.metrics
    assert m["num_preemptions"] > 0
    assert any(s.preempted for s in result.steps)
    assert all(count == 1 for count in result.finish_count.values())
    assert m["computed_prefill_tokens"] > build_plan(requests).planned_prefill_tokens
    assert max(s.kv_pages_in_use for s in result.steps) <= 14


def test_batchllm_admits_past_the_baselines_request_cap():
    requests, output_lens = _micro(8, 2, 8, 2, 4)
    budgets = Budgets(max_tokens_per_step=256, kv_budget_pages=200, page_size=4, max_num_seqs=2)
    result = run_checked(make_batcher("batchllm", requests, budgets), requests, output_lens,
                         budgets)
    assert max(sum(c.is_decode for c in s.chunks) for s in result.steps) > 2


@pytest.mark.parametrize("chain, prefix_len", [((), 0), ((3,), 12), ((3, 5), 20)])
def test_a_groups_decode_chunks_are_those_make_chunk_gives(chain, prefix_len):
    """A decode step makes a group's decode chunks in one pass (`decode_chunks`): the same
    chunks as `make_chunk` makes one by one."""
    seqs = []
    for i in range(4):
        seq = Sequence_(i, list(range(10 + i)), 8, prefix_len, chain)
        seq.add_pages(list(range(1 + 4 * i, 1 + 4 * i + pages_for(10 + i, 4))))
        seq.num_computed, seq.num_generated = 9 + i, 1 + i  # its last sampled token pending
        seqs.append(seq)
    chunks = decode_chunks(seqs)
    assert chunks == [make_chunk(seq, 1) for seq in seqs]
    assert all(c.is_decode and c.sample for c in chunks)


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_below_one_request_fails_before_any_step(policy):
    requests = [SchedRequest(tuple(range(30)), 10)]
    with pytest.raises(BudgetTooSmall, match="budget"):
        make_batcher(policy, requests, Budgets(64, kv_budget_pages=9, page_size=4))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_chain_and_its_requests_start_in_the_step_that_finishes_each_segment(overlap):
    """A step writes its keys layer by layer before its attention reads any, so a segment's
    child and the requests below the chain start in the step holding its parent's last
    chunk: one step runs the whole two-segment chain and the requests' prompts, and the
    reference executor finds every context's keys where they are read."""
    requests, groups = _two_segment_group()
    budgets = Budgets(max_tokens_per_step=32, kv_budget_pages=16, page_size=4)
    batcher = BatchLLMBatcher(requests, groups, budgets)
    result = run_checked(batcher, requests, [3, 4], budgets, overlap)
    first = result.steps[0].chunks
    assert [(c.seq_id, c.num_tokens) for c in first] == [(-4, 5), (-8, 3), (0, 6), (1, 1)]
    assert len(result.steps) == 4  # then 3 decode steps: the longest request's 4 tokens


def _two_segment_group():
    """One group whose prefix is two shared segments of 5 and 3 tokens (pages of 4: 2 + 1,
    each segment on fresh pages, not the 2 pages its 8 tokens would fill), and two requests
    whose own parts at max_tokens take 3 and 2 pages: 6 pages to run alone."""
    prefix = tuple(range(10, 18))
    requests = [SchedRequest(prefix + tuple(range(40, 46)), 3),  # 6 own + 3 = 9: 3 pages
                SchedRequest(prefix + (50,), 4)]  # 1 own + 4 = 5: 2 pages
    groups = [(7, prefix, (0, 1), ((3, 5), (7, 8)))]
    return requests, groups


def test_a_group_that_just_fits_passes_the_budget_check_and_runs_within_it():
    requests, groups = _two_segment_group()
    budgets = Budgets(max_tokens_per_step=8, kv_budget_pages=6, page_size=4)
    check_kv_budget(requests, budgets, groups)
    result = run_checked(BatchLLMBatcher(requests, groups, budgets), requests, [3, 4], budgets)
    assert all(count == 1 for count in result.finish_count.values())
    assert result.metrics["peak_kv_pages"] <= 6


def test_a_group_one_page_over_the_budget_is_refused_by_the_check_and_the_batcher():
    requests, groups = _two_segment_group()
    budgets = Budgets(max_tokens_per_step=8, kv_budget_pages=5, page_size=4)
    message = r"group 7 needs 3 prefix pages \+ 3 pages .* budget of 5 pages of 4 tokens"
    with pytest.raises(BudgetTooSmall, match=message):
        check_kv_budget(requests, budgets, groups)
    with pytest.raises(BudgetTooSmall, match=message):  # the batcher asks the same question
        BatchLLMBatcher(requests, groups, budgets)


def test_without_groups_each_request_is_checked_alone():
    requests = [SchedRequest(tuple(range(5)), 3), SchedRequest(tuple(range(30)), 10)]
    check_kv_budget(requests, Budgets(64, kv_budget_pages=10, page_size=4))  # 40 tokens
    with pytest.raises(BudgetTooSmall, match="request 1 needs 10 pages .* budget of 9 pages"):
        check_kv_budget(requests, Budgets(64, kv_budget_pages=9, page_size=4))


@pytest.mark.parametrize("policy", ["vllm", "sglang"])
def test_prefix_caches_reuse_whole_pages_of_an_earlier_request(policy):
    requests = [SchedRequest(tuple(range(10)) + (50 + i,), 1) for i in range(2)]
    budgets = Budgets(max_tokens_per_step=11, kv_budget_pages=20, page_size=4, max_num_seqs=1)
    result = run_checked(make_batcher(policy, requests, budgets), requests, [1, 1], budgets)
    second = [c for s in result.steps for c in s.chunks if c.seq_id == 1][0]
    assert second.own_start == 8  # two full pages of 4 reused, the rest computed
    assert result.metrics["computed_prefill_tokens"] == 11 + 3


@pytest.mark.parametrize("policy", ["none", "vllm", "sglang"])
def test_a_request_preempted_while_its_last_token_is_in_flight_finishes_once(policy):
    # Request 0 samples its last token (before max_tokens) in the step in which the next one
    # is planned; that plan preempts it for want of pages, and only then does the batcher
    # learn that it finished: it must leave the waiting queue, not run again.
    requests = [SchedRequest((0, 0, 0), 2), SchedRequest((0, 0, 0), 3),
                SchedRequest((0, 0, 0, 0), 2)]
    output_lens = [1, 2, 1]
    budgets = tight_budgets(requests, 1, 0)
    result = replay(policy, requests, output_lens, budgets, overlap=True)
    assert all(count == 1 for count in result.finish_count.values())
    assert result.metrics["num_preemptions"] > 0
    assert [len(result.generated[i]) for i in range(3)] == output_lens


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=40, deadline=None)
@given(work=workloads(), page_size=st.sampled_from([1, 4]), slack=st.integers(0, 6),
       data=st.data())
def test_positions_whose_logits_are_needed_are_computed_by_the_request(policy, work, page_size,
                                                                       slack, data):
    """A request that scores its prompt from `logits_from` computes every prompt token from
    there itself: no shared segment and no cached page stands in for them, so each of their
    logits rows exists (and outputs are still those of the checking executor)."""
    requests, output_lens = work
    requests = [dataclasses.replace(r, logits_from=data.draw(
        st.none() | st.integers(0, len(r.prompt_token_ids) - 1))) for r in requests]
    budgets = tight_budgets(requests, page_size, slack)
    replay = run_checked(make_batcher(policy, requests, budgets), requests, output_lens,
                         budgets)
    for i, r in enumerate(requests):
        if r.logits_from is None:
            continue
        computed = set()
        for step in replay.steps:
            for c in step.chunks:
                if c.seq_id == i and not c.is_decode:
                    first = c.prefix_len + c.own_start
                    computed.update(range(first, first + c.num_tokens))
        assert set(range(r.logits_from, len(r.prompt_token_ids))) <= computed, f"request {i}"
