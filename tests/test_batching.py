"""Batchers of every policy, driven by a checking executor over random workloads.

The executor keeps a model of the KV pages and verifies every step.

Each KV slot holds a key that stands for "the KV of this token after these tokens": the
chained hash of the whole token sequence up to it. A chunk's token at own index j writes
H(key at j-1, token), reading j-1 from its own pages (or, at j == 0, the last slot of the
prefix it attends). For a request the written key must equal the chained hash of its true
sequence (prompt + what it generated) at that position, so a wrong token, a wrong position, a
missing or stale context page, or a page overwritten by another sequence is caught.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax.schedule.batching import BudgetTooSmall
from batchjax.schedule.plan import build_plan
from batchjax.schedule.policies import POLICIES, make_batcher
from batchjax.schedule.step_plan import (
    NULL_PAGE,
    Budgets,
    SampledToken,
    SchedRequest,
    StepPlan,
)


def chain(keys_before: int, token: int) -> int:
    return hash((keys_before, token))


@dataclasses.dataclass
class Replay:
    steps: list[StepPlan]
    generated: dict[int, list[int]]
    finish_count: dict[int, int]
    metrics: dict


def generated_token(seq_id: int, index: int) -> int:
    return 7 + (seq_id * 31 + index * 17) % 5  # few distinct values: generated text repeats


def run_checked(
    batcher,
    requests: Sequence[SchedRequest],
    output_lens: Sequence[int],
    budgets: Budgets,
    max_steps: int = 100_000,
) -> Replay:
    kv: dict[tuple[int, int], int] = {}  # (page, slot) -> key
    truth = {i: list(r.prompt_token_ids) for i, r in enumerate(requests)}
    truth_keys: dict[int, list[int]] = {}
    generated: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    finish_count = {i: 0 for i in range(len(requests))}
    steps: list[StepPlan] = []
    ps = budgets.page_size

    def key_at(i: int, pos: int) -> int:
        keys = truth_keys.setdefault(i, [])
        seq = truth[i]
        while len(keys) <= pos:
            keys.append(chain(keys[-1] if keys else 0, seq[len(keys)]))
        return keys[pos]

    while batcher.has_work():
        assert len(steps) < max_steps, "no progress"
        step = batcher.next_step()
        steps.append(step)
        assert step.num_tokens <= budgets.max_tokens_per_step
        assert step.chunks, "a step with no work while work remains would loop forever"
        live_pages = set()
        for table in [c.page_table for c in step.chunks] + [p.page_table for p in step.prefixes]:
            assert NULL_PAGE not in table
            assert all(1 <= p <= budgets.kv_budget_pages for p in table)
            live_pages.update(table)
        assert len(live_pages) <= budgets.kv_budget_pages
        assert step.kv_pages_in_use <= budgets.kv_budget_pages
        prefixes = {p.group_id: p for p in step.prefixes}
        sampled = []
        for c in step.chunks:
            assert len(c.page_table) * ps >= c.own_start + c.num_tokens
            if c.prefix_group is not None:
                ref = prefixes[c.prefix_group]
                assert ref.prefix_len == c.prefix_len
                assert len(ref.page_table) * ps >= ref.prefix_len
            if c.seq_id >= 0:
                i = c.seq_id
                assert finish_count[i] == 0, f"request {i} scheduled after finishing"
                # The whole context it attends holds its own true sequence.
                for pos in range(c.prefix_len):
                    ref = prefixes[c.prefix_group]
                    assert kv.get((ref.page_table[pos // ps], pos % ps)) == key_at(i, pos)
                for j in range(c.own_start):
                    slot = (c.page_table[j // ps], j % ps)
                    assert kv.get(slot) == key_at(i, c.prefix_len + j), f"stale context of {i}"
                expected = truth[i][c.prefix_len + c.own_start :][: c.num_tokens]
                assert list(c.token_ids) == expected, f"wrong tokens fed for request {i}"
                assert c.sample == (c.prefix_len + c.own_start + c.num_tokens == len(truth[i]))
            else:
                assert not c.sample and c.prefix_group is None and c.prefix_len == 0
            for t, token in enumerate(c.token_ids):
                j = c.own_start + t
                if j > 0:
                    before = kv[(c.page_table[(j - 1) // ps], (j - 1) % ps)]
                elif c.prefix_group is not None:
                    ref = prefixes[c.prefix_group]
                    last = ref.prefix_len - 1
                    before = kv[(ref.page_table[last // ps], last % ps)]
                else:
                    before = 0
                kv[(c.page_table[j // ps], j % ps)] = chain(before, token)
                if c.seq_id >= 0:
                    assert kv[(c.page_table[j // ps], j % ps)] == key_at(
                        c.seq_id, c.prefix_len + j
                    )
            if c.sample:
                i = c.seq_id
                token = generated_token(i, len(generated[i]))
                generated[i].append(token)
                truth[i].append(token)
                done = len(generated[i]) >= output_lens[i]
                finish_count[i] += done
                sampled.append(SampledToken(i, token, done))
        batcher.complete(step, sampled)
    return Replay(steps, generated, finish_count, batcher.metrics())


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


def tight_budgets(requests: Sequence[SchedRequest], page_size: int, slack: int) -> Budgets:
    worst = max(-(-(len(r.prompt_token_ids) + r.max_tokens) // page_size) for r in requests)
    # Room for the longest request plus a group prefix of up to the same length.
    return Budgets(
        max_tokens_per_step=16, kv_budget_pages=2 * worst + slack, page_size=page_size,
        max_num_seqs=4,
    )


def replay(policy: str, requests, output_lens, budgets: Budgets) -> Replay:
    return run_checked(make_batcher(policy, requests, budgets), requests, output_lens, budgets)


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=60, deadline=None)
@given(work=workloads(), page_size=st.sampled_from([1, 2, 4]), slack=st.integers(0, 6))
def test_every_request_completes_once_with_its_output_and_correct_kv(
    policy, work, page_size, slack
):
    requests, output_lens = work
    budgets = tight_budgets(requests, page_size, slack)
    result = replay(policy, requests, output_lens, budgets)
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


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_below_one_request_fails_before_any_step(policy):
    requests = [SchedRequest(tuple(range(30)), 10)]
    with pytest.raises(BudgetTooSmall, match="budget"):
        make_batcher(policy, requests, Budgets(64, kv_budget_pages=9, page_size=4))


@pytest.mark.parametrize("policy", ["vllm", "sglang"])
def test_prefix_caches_reuse_whole_pages_of_an_earlier_request(policy):
    requests = [SchedRequest(tuple(range(10)) + (50 + i,), 1) for i in range(2)]
    budgets = Budgets(max_tokens_per_step=11, kv_budget_pages=20, page_size=4, max_num_seqs=1)
    result = run_checked(make_batcher(policy, requests, budgets), requests, [1, 1], budgets)
    second = [c for s in result.steps for c in s.chunks if c.seq_id == 1][0]
    assert second.own_start == 8  # two full pages of 4 reused, the rest computed
    assert result.metrics["computed_prefill_tokens"] == 11 + 3
