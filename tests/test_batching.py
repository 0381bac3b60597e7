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
from batchjax.schedule.driver import run_batcher
from batchjax.schedule.step_plan import (
    NULL_PAGE,
    Budgets,
    SampledToken,
    SchedRequest,
    StepPlan,
    placeholder_row,
    placeholder_token,
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


def context_slot(chunk, prefixes, pos: int, page_size: int) -> tuple[int, int]:
    """(page, slot) of context position `pos` (< prefix_len) along the chunk's chain."""
    for seg in chunk.prefix_chain:
        ref = prefixes[seg]
        if pos < ref.prefix_len:
            return ref.page_table[pos // page_size], pos % page_size
        pos -= ref.prefix_len
    raise AssertionError(f"position past the chain of sequence {chunk.seq_id}")


class CheckingExecutor:
    """A `StepExecutor` that models the KV pages and checks every step as it launches.

    With `overlap`, the batcher plans each step before the previous one's tokens are back:
    placeholders are resolved from the previous step's sampled rows (as the device does), and
    a request that its output length ends (its "EOS" before `max_tokens`) may be scheduled for
    one more step, whose work is dropped.
    """

    def __init__(self, requests, output_lens, budgets: Budgets, overlap: bool):
        self.kv: dict[tuple[int, int], int] = {}  # (page, slot) -> key
        self.truth = {i: list(r.prompt_token_ids) for i, r in enumerate(requests)}
        self.truth_keys: dict[int, list[int]] = {}
        self.generated: dict[int, list[int]] = {i: [] for i in range(len(requests))}
        self.finish_count = {i: 0 for i in range(len(requests))}
        self.ended_at: dict[int, int] = {}  # request -> the step that sampled its last token
        self.steps: list[StepPlan] = []
        self.max_tokens = [r.max_tokens for r in requests]
        self.output_lens = output_lens
        self.budgets = budgets
        self.overlap = overlap
        self.previous_rows: list[int] = []  # tokens of the last launched step's sampled rows

    def key_at(self, i: int, pos: int) -> int:
        keys = self.truth_keys.setdefault(i, [])
        seq = self.truth[i]
        while len(keys) <= pos:
            keys.append(chain(keys[-1] if keys else 0, seq[len(keys)]))
        return keys[pos]

    def launch(self, step: StepPlan):
        budgets, kv, ps = self.budgets, self.kv, self.budgets.page_size
        index = len(self.steps)
        self.steps.append(step)
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
        rows = []  # (request, token) per sampled row
        for c in step.chunks:
            tokens = [self.previous_rows[placeholder_row(t)] if t < 0 else t
                      for t in c.token_ids]
            assert self.overlap or tokens == list(c.token_ids), "placeholder without overlap"
            assert len(c.page_table) * ps >= c.own_start + c.num_tokens
            if c.prefix_group is not None:
                refs = [prefixes[s] for s in c.prefix_chain]
                assert c.prefix_chain[-1] == c.prefix_group
                assert [r.level for r in refs] == list(range(len(refs)))
                assert sum(r.prefix_len for r in refs) == c.prefix_len
                assert all(len(r.page_table) * ps >= r.prefix_len for r in refs)
            dropped = c.seq_id in self.ended_at
            if dropped:  # known finished only after this step was planned
                assert self.overlap and self.ended_at[c.seq_id] == index - 1, (
                    f"request {c.seq_id} scheduled after finishing")
            elif c.seq_id >= 0:
                i = c.seq_id
                # The whole context it attends holds its own true sequence.
                for pos in range(c.prefix_len):
                    assert kv.get(context_slot(c, prefixes, pos, ps)) == self.key_at(i, pos)
                for j in range(c.own_start):
                    slot = (c.page_table[j // ps], j % ps)
                    assert kv.get(slot) == self.key_at(i, c.prefix_len + j), (
                        f"stale context of {i}")
                expected = self.truth[i][c.prefix_len + c.own_start :][: c.num_tokens]
                assert tokens == expected, f"wrong tokens fed for request {i}"
                assert c.sample == (c.prefix_len + c.own_start + c.num_tokens
                                    == len(self.truth[i]))
            else:  # a shared segment: its context is its chain of ancestors
                assert not c.sample
                assert (c.prefix_group is None) == (c.prefix_len == 0) == (not c.prefix_chain)
            for t, token in enumerate(tokens):
                j = c.own_start + t
                if j > 0:
                    before = kv[(c.page_table[(j - 1) // ps], (j - 1) % ps)]
                elif c.prefix_group is not None:
                    before = kv[context_slot(c, prefixes, c.prefix_len - 1, ps)]
                else:
                    before = 0
                kv[(c.page_table[j // ps], j % ps)] = chain(before, token)
                if c.seq_id >= 0 and not dropped:
                    assert kv[(c.page_table[j // ps], j % ps)] == self.key_at(
                        c.seq_id, c.prefix_len + j)
            if c.sample and not dropped:
                i = c.seq_id
                token = generated_token(i, len(self.generated[i]))
                self.generated[i].append(token)
                self.truth[i].append(token)
                done = len(self.generated[i]) >= self.output_lens[i]
                if done:
                    self.ended_at[i] = index
                # Whether max_tokens ends it, which the executor knows without the token.
                by_length = len(self.generated[i]) >= self.max_tokens[i]
                rows.append((i, token, done, by_length))
            elif c.sample:  # the device samples it; nobody reads it
                rows.append((c.seq_id, -1, False, False))
        self.previous_rows = [row[1] for row in rows]
        return rows

    def provisional(self, step, rows):
        # What the token count alone decides; the output length is known only at `collect`.
        return [SampledToken(i, placeholder_token(k), by_length)
                for k, (i, token, _, by_length) in enumerate(rows) if token >= 0]

    def collect(self, step, rows):
        sampled = [SampledToken(i, token, done) for i, token, done, _ in rows if token >= 0]
        for token in sampled:
            self.finish_count[token.seq_id] += token.finished
        return sampled


def run_checked(
    batcher,
    requests: Sequence[SchedRequest],
    output_lens: Sequence[int],
    budgets: Budgets,
    overlap: bool = False,
) -> Replay:
    executor = CheckingExecutor(requests, output_lens, budgets, overlap)
    run_batcher(batcher, executor, overlap=overlap)
    return Replay(executor.steps, executor.generated, executor.finish_count, batcher.metrics())


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
