"""Scheduling policies by name: BatchLLM's pipeline and the online engines it is measured against.

`none`, `vllm` and `sglang` schedule requests first come, first served (SGLang reorders short
queues by cached prefix length) and share KV only through a cache of pages already computed,
found at admission: cached pages sit at the front of the request's own page table, and its
computation starts after them. Memory is allocated as chunks run and, when it runs out, the
most recently admitted running request is preempted and later recomputed, as vLLM v1 does.
`batchllm` plans prefix groups over the whole batch first (`plan.build_plan`) and batches
them by KV memory (`batching.BatchLLMBatcher`).
"""

from __future__ import annotations

import collections
from typing import Sequence

from batchjax.schedule.batching import (
    Batcher,
    BatchLLMBatcher,
    Sequence_,
    StepCounters,
    apply_sampled,
    check_kv_budget,
    resolve_sampled,
    make_chunk,
    pages_for,
)
from batchjax.schedule.pages import HashedPageCache, PagePool, RadixPageCache
from batchjax.schedule.plan import Plan, build_plan
from batchjax.schedule.prefix_tree import identify_prefixes
from batchjax.schedule.step_plan import Budgets, ChunkWork, SampledToken, SchedRequest, StepPlan

POLICIES = ("none", "vllm", "sglang", "batchllm")

# SGLang orders its waiting queue by longest cached prefix only while it is this short.
SGLANG_LPM_MAX_WAITING = 128


class CachedFcfsBatcher:
    """FCFS with an optional prefix cache (`hashed`: vLLM, `radix`: SGLang), chunked prefill."""

    prefix_levels = 1  # cached pages sit in each request's own table: no segment is attended

    def __init__(
        self,
        policy: str,
        requests: Sequence[SchedRequest],
        budgets: Budgets,
        *,
        cache: str | None,
        longest_prefix_first: bool = False,
        optimal_saving_ratio: float = 0.0,
    ):
        self._budgets = budgets
        self._page_size = budgets.page_size
        pool = PagePool(budgets.kv_budget_pages)
        self._pages: PagePool | HashedPageCache | RadixPageCache
        if cache is None:
            self._pages = pool
        elif cache == "hashed":
            self._pages = HashedPageCache(pool, budgets.page_size)
        elif cache == "radix":
            self._pages = RadixPageCache(pool, budgets.page_size)
        else:
            raise ValueError(f"unknown prefix cache {cache!r}")
        self._longest_prefix_first = longest_prefix_first
        self._counters = StepCounters(policy, requests, budgets)
        self._optimal = optimal_saving_ratio
        self._prompt_lens = [len(r.prompt_token_ids) for r in requests]
        self._shareable = [r.shareable_len for r in requests]  # most cached tokens of each
        self._seqs: dict[int, Sequence_] = {}
        for i, r in enumerate(requests):
            if not r.prompt_token_ids:
                raise ValueError(f"request {i} has an empty prompt")
            self._seqs[i] = Sequence_(i, list(r.prompt_token_ids), r.max_tokens)
        check_kv_budget(requests, budgets)
        self._page_keys: dict[int, list[int]] = {}  # hashed cache: computed at first admission
        self._num_cached_pages: dict[int, int] = {}  # full prompt pages already in the cache
        self._waiting: collections.deque[int] = collections.deque(range(len(requests)))
        self._running: dict[int, None] = {}  # admission order: the last one is preempted first
        self._step_index = 0
        self._num_unfinished = len(requests)

    def has_work(self) -> bool:
        return self._num_unfinished > 0

    def next_step(self) -> StepPlan:
        budget = self._budgets.max_tokens_per_step
        chunks: list[ChunkWork] = []
        preempted: list[int] = []
        for rid in list(self._running):
            if not budget or rid not in self._running:
                break
            seq = self._seqs[rid]
            n = min(seq.num_pending, budget)
            need = pages_for(seq.num_computed + n, self._page_size) - len(seq.pages)
            # Most decode tokens fit their last page: no need to ask the pool.
            while need > 0 and need > self._pages.num_available and rid in self._running:
                preempted.append(self._preempt_last())
            if rid not in self._running:
                break
            chunks.append(self._run(seq, n, need))
            budget -= n
        if not preempted:
            self._order_waiting()
            cap = self._budgets.max_num_seqs
            while budget and self._waiting and (cap is None or len(self._running) < cap):
                seq = self._seqs[self._waiting[0]]
                self._reuse_cached_pages(seq)
                n = min(seq.num_pending, budget)
                need = pages_for(seq.num_computed + n, self._page_size) - len(seq.pages)
                if need > self._pages.num_available:
                    self._pages.release(seq.drop_kv())
                    break
                self._waiting.popleft()
                self._running[seq.seq_id] = None
                chunks.append(self._run(seq, n, need))
                budget -= n
        step = StepPlan(
            self._step_index, tuple(chunks), (), tuple(preempted), self._pages.num_in_use
        )
        self._step_index += 1
        self._counters.count_step(step)
        return step

    def complete(self, step: StepPlan, sampled: Sequence[SampledToken]) -> None:
        self._counters.output_tokens += len(sampled)
        ended = {c.seq_id for c in step.chunks if self._seqs[c.seq_id].finished}
        finished = apply_sampled(self._seqs, step, sampled)
        if not isinstance(self._pages, PagePool):
            for chunk in step.chunks:
                # A chunk of a request that ended while the step was in flight left no pages.
                if not chunk.is_decode and chunk.seq_id not in ended:
                    self._cache_prompt_pages(self._seqs[chunk.seq_id])
        for seq in finished:
            self._finish(seq)

    def resolve(self, sampled: Sequence[SampledToken]) -> None:
        for seq in resolve_sampled(self._seqs, sampled):
            self._finish(seq)

    def _finish(self, seq: Sequence_) -> None:
        if seq.seq_id in self._running:
            del self._running[seq.seq_id]
        else:  # preempted while its last token was in flight
            self._waiting.remove(seq.seq_id)
        self._pages.release(seq.drop_kv())
        self._num_unfinished -= 1

    def metrics(self) -> dict:
        return self._counters.as_dict(0, self._optimal, 0.0)

    def _run(self, seq: Sequence_, n: int, need: int) -> ChunkWork:
        if need > 0:
            seq.add_pages(self._pages.allocate(need))
        return make_chunk(seq, n)

    def _preempt_last(self) -> int:
        rid = next(reversed(self._running))
        del self._running[rid]
        self._pages.release(self._seqs[rid].drop_kv())
        self._num_cached_pages.pop(rid, None)
        self._waiting.appendleft(rid)
        self._counters.num_preemptions += 1
        return rid

    def _order_waiting(self) -> None:
        if not self._longest_prefix_first or len(self._waiting) > SGLANG_LPM_MAX_WAITING:
            return
        assert isinstance(self._pages, RadixPageCache)
        cached = {rid: self._pages.match_len(self._seqs[rid].tokens) for rid in self._waiting}
        self._waiting = collections.deque(sorted(self._waiting, key=lambda rid: -cached[rid]))

    def _reuse_cached_pages(self, seq: Sequence_) -> None:
        """Starts `seq` after its longest cached run of full pages (at least one token left,
        and none whose logits it needs). A waiting request holds no pages."""
        max_pages = min(len(seq.tokens) - 1, self._shareable[seq.seq_id]) // self._page_size
        if isinstance(self._pages, HashedPageCache):
            keys = self._prompt_keys(seq)
            seq.add_pages(self._pages.match(keys, max_pages))
        elif isinstance(self._pages, RadixPageCache):
            seq.add_pages(self._pages.match(seq.tokens, max_pages))
        seq.num_computed = len(seq.pages) * self._page_size

    def _prompt_keys(self, seq: Sequence_) -> list[int]:
        keys = self._page_keys.get(seq.seq_id)
        if keys is None:
            keys = self._pages.page_keys(seq.tokens[: self._prompt_lens[seq.seq_id]])
            self._page_keys[seq.seq_id] = keys
        return keys

    def _cache_prompt_pages(self, seq: Sequence_) -> None:
        """Indexes the full prompt pages computed so far, so later requests can reuse them."""
        full = min(seq.num_computed, self._prompt_lens[seq.seq_id]) // self._page_size
        if full <= self._num_cached_pages.get(seq.seq_id, 0):
            return
        self._num_cached_pages[seq.seq_id] = full
        if isinstance(self._pages, HashedPageCache):
            self._pages.insert(self._prompt_keys(seq)[:full], seq.pages[:full])
        else:
            self._pages.insert(seq.tokens[: full * self._page_size], seq.pages[:full])


def make_batcher(
    policy: str,
    requests: Sequence[SchedRequest],
    budgets: Budgets,
    **options,
) -> Batcher:
    """A batcher for `policy` (one of POLICIES) over `requests`.

    Options of `batchllm`: `plan` (a `Plan` of these requests, built here when absent) or the
    keyword arguments of `plan.build_plan` (`grouping_method`, `align_to_pages`, `order_key`,
    `prefix_levels`, `min_saved_tokens`).
    Options of the baselines: `optimal_saving_ratio` (reported as is; computed from the
    prompts when absent).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if policy == "batchllm":
        plan: Plan | None = options.pop("plan", None)
        if plan is None:
            plan = build_plan(requests, **options)
        elif options:
            raise ValueError(f"options {sorted(options)} conflict with a given plan")
        if plan.num_requests != len(requests):
            raise ValueError(f"the plan covers {plan.num_requests} requests, not {len(requests)}")
        return BatchLLMBatcher(
            requests,
            plan.group_work(),
            budgets,
            optimal_saving_ratio=plan.optimal_saving_ratio,
            plan_s=plan.plan_s,
        )
    optimal = options.pop("optimal_saving_ratio", None)
    if optimal is None:
        optimal = identify_prefixes([r.prompt_token_ids for r in requests]).optimal_saving_ratio
    if policy == "none":
        return CachedFcfsBatcher(
            policy, requests, budgets, cache=None, optimal_saving_ratio=optimal
        )
    if policy == "vllm":
        return CachedFcfsBatcher(
            policy, requests, budgets, cache="hashed", optimal_saving_ratio=optimal
        )
    if policy == "sglang":
        return CachedFcfsBatcher(
            policy,
            requests,
            budgets,
            cache="radix",
            longest_prefix_first=True,
            optimal_saving_ratio=optimal,
        )
