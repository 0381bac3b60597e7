"""A reference model of the KV pages, and the invariants every batcher must keep.

`CheckingExecutor` is a `StepExecutor` without a model: it keeps, for every KV slot, a key that
stands for "the KV of this token after these tokens" (the chained hash of the whole token
sequence up to it). A chunk's token at own index j writes H(key at j-1, token), reading j-1
from its own pages (or, at j == 0, the last slot of the prefix it attends). For a request the
written key must equal the chained hash of its true sequence (prompt + what it generated) at
that position, so a wrong token, a wrong position, a missing or stale context page, or a page
overwritten by another sequence fails an assertion as the step launches.

`check_invariants` runs one workload under one policy through it and lists what broke;
`random_workload` draws workloads whose prompts share prefixes of every shape. The test suite
(tests/test_batching.py) and the fault campaign (experiments/faults.py) both use them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from batchjax.schedule.driver import run_batcher
from batchjax.schedule.policies import make_batcher
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



def tight_budgets(requests: Sequence[SchedRequest], page_size: int, slack: int) -> Budgets:
    worst = max(-(-(len(r.prompt_token_ids) + r.max_tokens) // page_size) for r in requests)
    # Room for the longest request plus a group prefix of up to the same length.
    return Budgets(
        max_tokens_per_step=16, kv_budget_pages=2 * worst + slack, page_size=page_size,
        max_num_seqs=4,
    )



def random_workload(rng: np.random.Generator) -> tuple[list[SchedRequest], list[int]]:
    """Prompts built from a few nested or overlapping stems over a 4-token vocabulary, so they
    share prefixes of every shape (nested, overlapping, identical, one token, none); true
    output lengths at most max_tokens, and length estimates that may be low (batchllm then
    under-reserves and preempts)."""
    stems = [rng.integers(0, 4, int(rng.integers(0, 21))).tolist()
             for _ in range(int(rng.integers(1, 5)))]
    for k in range(1, len(stems)):
        if rng.random() < 0.5:
            stems[k] = stems[int(rng.integers(0, k))] + stems[k]
    requests, output_lens = [], []
    for _ in range(int(rng.integers(1, 15))):
        stem = stems[int(rng.integers(0, len(stems)))]
        tail = rng.integers(0, 4, int(rng.integers(0 if stem else 1, 13))).tolist()
        max_tokens = int(rng.integers(1, 9))
        output_lens.append(int(rng.integers(1, max_tokens + 1)))
        estimate = None if rng.random() < 0.5 else int(rng.integers(0, max_tokens + 1))
        requests.append(SchedRequest(tuple(stem + tail), max_tokens, estimate))
    return requests, output_lens


def trie_tokens(requests: Sequence[SchedRequest]) -> int:
    """Distinct nodes of the prompts' token trie: the fewest prompt tokens any schedule that
    computes every prompt can compute."""
    seen: set[tuple[int, ...]] = set()
    for r in requests:
        ids = tuple(r.prompt_token_ids)
        seen.update(ids[: k + 1] for k in range(len(ids)))
    return len(seen)


# Policies whose page pool holds nothing once the job ends (the others keep a prefix cache).
_EMPTY_AT_END = ("batchllm", "none")


def check_invariants(policy: str, requests: Sequence[SchedRequest], output_lens: Sequence[int],
                     budgets: Budgets, overlap: bool = False) -> list[str]:
    """What broke when `requests` ran under `policy` (empty: nothing). Checked: every step's
    KV (`CheckingExecutor`), the KV budget at every step, every request finishing exactly once
    with its whole output, the page pool empty at the end (policies without a prefix cache),
    computed prefill tokens at least the trie's optimum, and the same schedule on a rerun."""
    try:
        first = run_checked(make_batcher(policy, requests, budgets), requests, output_lens,
                            budgets, overlap)
        again = run_checked(make_batcher(policy, requests, budgets), requests, output_lens,
                            budgets, overlap)
    except AssertionError as e:
        return [f"step check failed: {e}"]
    broken = []
    if any(count != 1 for count in first.finish_count.values()):
        broken.append(f"finish counts {first.finish_count}")
    if [len(first.generated[i]) for i in range(len(requests))] != list(output_lens):
        broken.append("an output has the wrong length")
    m = first.metrics
    if m["peak_kv_pages"] > budgets.kv_budget_pages:
        broken.append(f"peak {m['peak_kv_pages']} pages over the budget {budgets.kv_budget_pages}")
    if max((s.kv_pages_in_use for s in first.steps), default=0) > budgets.kv_budget_pages:
        broken.append("a step's pages in use exceed the budget")
    if policy in _EMPTY_AT_END and m.get("kv_pages_at_end", 0) != 0:
        broken.append(f"{m['kv_pages_at_end']} pages still held at the end")
    if m["computed_prefill_tokens"] < trie_tokens(requests):
        broken.append(f"computed {m['computed_prefill_tokens']} prompt tokens, below the trie's "
                      f"{trie_tokens(requests)}")
    if first.steps != again.steps:
        broken.append("a rerun planned different steps")
    return broken
