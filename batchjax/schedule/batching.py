"""Memory-centric token batching: the run-time half of the schedule.

A batcher turns a batch of requests into `StepPlan`s, one per step, and learns from the
executor what each step sampled. It owns every KV page id, so the engine and the simulator
account memory identically. `BatchLLMBatcher` is DESIGN.md's transform 4 over a plan's prefix
groups; the baselines (`none`, `vllm`, `sglang`) live in `policies.py` on the same machinery.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Protocol, Sequence

from batchjax.metrics import saving_ratio
from batchjax.schedule.pages import PagePool
from batchjax.schedule.step_plan import (
    Budgets,
    ChunkWork,
    PrefixRef,
    SampledToken,
    SchedRequest,
    StepPlan,
    prefix_seq_id,
)


class GroupSource(Protocol):
    """Where a data-parallel replica's batcher takes its next whole prefix group."""

    def take(self, dry: bool) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
        """(group_id, prefix_token_ids, request_ids in run order), or None when no group is
        left for this replica now. `dry`: the replica has nothing left running, and may take
        another replica's unstarted group."""


class BudgetTooSmall(ValueError):
    """The KV budget cannot hold even one request (with its prefix) at its full length."""


class Batcher(Protocol):
    def has_work(self) -> bool: ...

    def next_step(self) -> StepPlan: ...

    def complete(self, step: StepPlan, sampled: Sequence[SampledToken]) -> None:
        """The step ran (or is running): every chunk's tokens now have KV. `sampled` holds a
        token per sampling chunk of a request not finished before; its id may be a
        placeholder (`placeholder_token`), which `resolve` replaces before the next
        `complete`."""

    def resolve(self, sampled: Sequence[SampledToken]) -> None:
        """The real tokens behind the last `complete`'s placeholders, and the requests that
        they finished (EOS, stop tokens or strings), wherever those requests are now."""

    def metrics(self) -> dict: ...


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


@dataclasses.dataclass(eq=False, slots=True)
class Sequence_:
    """Mutable run-time state of one sequence: a request, or a group's shared prefix.

    `tokens` is the own part known so far (a request: its prompt after the group prefix, then
    what it generated; a prefix: the prefix). The first `num_computed` have KV in `pages`.
    """

    seq_id: int
    tokens: list[int]
    max_tokens: int
    prefix_group: int | None = None
    prefix_len: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    num_generated: int = 0
    reserved_pages: int = 0
    finished: bool = False
    _table: tuple[int, ...] = ()

    @property
    def is_request(self) -> bool:
        return self.seq_id >= 0

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing its KV: the next chunk is one decode token."""
        return self.num_generated > 0 and self.num_pending == 1

    def page_table(self) -> tuple[int, ...]:
        if len(self._table) != len(self.pages):
            self._table = tuple(self.pages)
        return self._table

    def drop_kv(self) -> list[int]:
        """Forget the computed KV (preemption); returns the pages to hand back."""
        pages, self.pages, self._table = self.pages, [], ()
        self.num_computed = 0
        return pages


class StepCounters:
    """Counts every policy reports under the same names (DESIGN.md, Metrics)."""

    def __init__(self, policy: str, requests: Sequence[SchedRequest], budgets: Budgets):
        self.policy = policy
        self.num_requests = len(requests)
        self.logical_prefill_tokens = sum(len(r.prompt_token_ids) for r in requests)
        self.computed_prefill_tokens = 0
        self.output_tokens = 0
        self.num_steps = 0
        self.peak_kv_pages = 0
        self.kv_budget_pages = budgets.kv_budget_pages
        self.num_preemptions = 0  # requests preempted (their KV dropped, recomputed later)
        self.num_preempted_groups = 0  # groups preempted, including ones only their prefix ran

    def add_requests(self, requests) -> None:
        """Requests a replica took on after it started (`GroupSource`)."""
        for r in requests:
            self.num_requests += 1
            self.logical_prefill_tokens += len(r.prompt_token_ids)

    def count_step(self, step: StepPlan) -> None:
        self.num_steps += 1
        self.peak_kv_pages = max(self.peak_kv_pages, step.kv_pages_in_use)
        # Everything but decode inputs is prefill, including recomputation after preemption.
        self.computed_prefill_tokens += sum(c.num_tokens for c in step.chunks if not c.is_decode)

    def as_dict(self, num_groups: int, optimal_saving_ratio: float, plan_s: float) -> dict:
        logical = self.logical_prefill_tokens
        return {
            "policy": self.policy,
            "num_requests": self.num_requests,
            "num_groups": num_groups,
            "logical_prefill_tokens": logical,
            "computed_prefill_tokens": self.computed_prefill_tokens,
            "saving_ratio": saving_ratio(logical, self.computed_prefill_tokens),
            "optimal_saving_ratio": optimal_saving_ratio,
            "output_tokens": self.output_tokens,
            "num_steps": self.num_steps,
            "peak_kv_pages": self.peak_kv_pages,
            "kv_budget_pages": self.kv_budget_pages,
            "num_preemptions": self.num_preemptions,
            "num_preempted_groups": self.num_preempted_groups,
            "plan_s": plan_s,
        }


def make_chunk(seq: Sequence_, num_tokens: int, attends_prefix: bool) -> ChunkWork:
    """The next `num_tokens` of `seq`; its pages must already cover them."""
    start = seq.num_computed
    end = start + num_tokens
    last = end == len(seq.tokens)
    return ChunkWork(
        seq_id=seq.seq_id,
        token_ids=tuple(seq.tokens[start:end]),
        own_start=start,
        page_table=seq.page_table(),
        prefix_group=seq.prefix_group if attends_prefix else None,
        prefix_len=seq.prefix_len if attends_prefix else 0,
        sample=seq.is_request and last,
        is_decode=seq.is_request and last and seq.num_generated > 0 and num_tokens == 1,
    )


def resolve_sampled(seqs: dict[int, Sequence_],
                    sampled: Sequence[SampledToken]) -> list[Sequence_]:
    """Puts each real token in place of its placeholder (a sequence's last token: nothing is
    appended between `complete` and `resolve`); returns the requests it newly finished."""
    finished = []
    for token in sampled:
        seq = seqs[token.seq_id]
        if seq.tokens and seq.tokens[-1] < 0:
            seq.tokens[-1] = token.token_id
        if token.finished and not seq.finished:
            seq.finished = True
            finished.append(seq)
    return finished


def apply_sampled(
    seqs: dict[int, Sequence_], step: StepPlan, sampled: Sequence[SampledToken]
) -> list[Sequence_]:
    """Advances every chunk's sequence; returns the requests that finished in this step.

    A chunk of a request that finished while the step was in flight changes nothing."""
    for chunk in step.chunks:
        seq = seqs[chunk.seq_id]
        if not seq.finished:
            seq.num_computed += chunk.num_tokens
    finished = []
    for token in sampled:
        seq = seqs[token.seq_id]
        seq.tokens.append(token.token_id)
        seq.num_generated += 1
        if token.finished:
            seq.finished = True
            finished.append(seq)
    return finished


@dataclasses.dataclass(eq=False, slots=True)
class _GroupState:
    """A plan group at run time. Its reservation is `prefix_pages + max(pledge, running)`:
    the pledge keeps room for one of its requests, so an admitted group can always progress."""

    group_id: int
    prefix: Sequence_ | None  # None: nothing shared, nothing to compute first
    request_ids: tuple[int, ...]
    waiting: collections.deque[int]
    running: dict[int, None]
    prefix_pages: int = 0
    pledge_pages: int = 0
    running_pages: int = 0
    num_unfinished: int = 0

    @property
    def prefix_ready(self) -> bool:
        return self.prefix is None or self.prefix.num_pending == 0

    @property
    def reserved_pages(self) -> int:
        return self.prefix_pages + max(self.pledge_pages, self.running_pages)


class BatchLLMBatcher:
    """Groups in plan order; each step: decode, then suffixes of computed groups, then prefixes.

    Admission is by KV memory only: a request reserves pages for its own prompt part plus its
    decode estimate (`decode_estimate`, else `max_tokens`); a group adds its prefix pages once.
    When decoding outgrows a reservation and the budget would be exceeded, the most recently
    admitted group is preempted whole (its KV dropped and recomputed later); its requests keep
    what they generated and reserve for their full `max_tokens` from then on.
    """

    def __init__(
        self,
        requests: Sequence[SchedRequest],
        groups: Sequence[tuple[int, tuple[int, ...], tuple[int, ...]]],
        budgets: Budgets,
        *,
        policy: str = "batchllm",
        optimal_saving_ratio: float = 0.0,
        plan_s: float = 0.0,
        source: "GroupSource | None" = None,
    ):
        """`groups`: (group_id, prefix_token_ids, request_ids in run order), in run order.

        With `source` (a data-parallel replica), `groups` may be empty: the batcher takes
        further groups from `source` one at a time, when it has room to start one, so the
        groups it has not taken stay free for other replicas (`GroupSource`). Request ids
        index `requests` either way.
        """
        self._budgets = budgets
        self._page_size = budgets.page_size
        self._pool = PagePool(budgets.kv_budget_pages)
        self._requests = requests
        self._source = source
        self._counters = StepCounters(policy, requests if source is None else (), budgets)
        self._optimal = optimal_saving_ratio
        self._plan_s = plan_s
        self._num_groups = 0
        self._seqs: dict[int, Sequence_] = {}
        self._groups: dict[int, _GroupState] = {}
        self._estimate_pages: dict[int, int] = {}
        self._group_of_request: dict[int, int] = {}
        self._pending: collections.deque[int] = collections.deque()
        self._num_unfinished = 0
        for group in groups:
            self._add_group(*group)
        if source is None and sorted(self._group_of_request) != list(range(len(requests))):
            raise ValueError("the plan's groups must cover every request exactly once")
        self._active: dict[int, None] = {}  # admission order: the last one is preempted first
        self._reserved = 0
        self._step_index = 0

    def _add_group(self, group_id: int, prefix_tokens, request_ids) -> None:
        """Registers a group at the end of the run order."""
        budgets, requests = self._budgets, self._requests
        prefix_len = len(prefix_tokens)
        prefix = None
        if group_id in self._groups:
            raise ValueError(f"group {group_id} was given twice")
        if prefix_len:
            prefix = Sequence_(prefix_seq_id(group_id), list(prefix_tokens), 0)
            self._seqs[prefix.seq_id] = prefix
        group = _GroupState(
            group_id,
            prefix,
            tuple(request_ids),
            collections.deque(request_ids),
            {},
            prefix_pages=pages_for(prefix_len, self._page_size),
            num_unfinished=len(request_ids),
        )
        worst = 0
        for i in request_ids:
            r = requests[i]
            if tuple(r.prompt_token_ids[:prefix_len]) != tuple(prefix_tokens):
                raise ValueError(f"request {i} does not start with group {group_id}'s prefix")
            own = list(r.prompt_token_ids[prefix_len:])
            if not own:
                raise ValueError(f"request {i} has no tokens after group {group_id}'s prefix")
            if i in self._group_of_request:
                raise ValueError(f"request {i} is in two groups")
            worst = max(worst, pages_for(len(own) + r.max_tokens, self._page_size))
        if group.prefix_pages + worst > budgets.kv_budget_pages:
            raise BudgetTooSmall(
                f"group {group_id} needs {group.prefix_pages} prefix pages + {worst} pages "
                f"for its longest request at max_tokens, over the budget of "
                f"{budgets.kv_budget_pages} pages of {self._page_size} tokens"
            )
        for i in request_ids:
            r = requests[i]
            own = list(r.prompt_token_ids[prefix_len:])
            self._group_of_request[i] = group_id
            self._seqs[i] = Sequence_(i, own, r.max_tokens, group_id if prefix_len else None,
                                      prefix_len)
            estimate = r.max_tokens if r.decode_estimate is None else r.decode_estimate
            self._estimate_pages[i] = pages_for(len(own) + int(estimate), self._page_size)
        self._groups[group_id] = group
        self._pending.append(group_id)
        self._num_groups += 1
        self._num_unfinished += len(request_ids)
        if self._source is not None:
            self._counters.add_requests(requests[i] for i in request_ids)

    def _take_from_source(self) -> bool:
        """One more group from `source`, if it has one; False when it is dry."""
        if self._source is None:
            return False
        group = self._source.take(dry=self._num_unfinished == 0)
        if group is None:
            return False
        self._add_group(*group)
        return True

    # -- Batcher ---------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self._num_unfinished > 0 or self._take_from_source()

    def next_step(self) -> StepPlan:
        preempted = self._reserve_decode_growth()
        budget = self._budgets.max_tokens_per_step
        chunks: list[ChunkWork] = []
        # (a) one decode token for every running request.
        for gid in self._active:
            for rid in self._groups[gid].running:
                seq = self._seqs[rid]
                if budget and seq.is_decoding:
                    chunks.append(self._run(seq, 1))
                    budget -= 1
        # (b) suffix prefill of groups whose prefix is computed: running chunks first.
        for gid in self._active:
            group = self._groups[gid]
            if not group.prefix_ready:
                continue
            for rid in group.running:
                seq = self._seqs[rid]
                if budget and not seq.is_decoding and seq.num_pending:
                    n = min(seq.num_pending, budget)
                    chunks.append(self._run(seq, n))
                    budget -= n
            budget = self._admit_requests(group, budget, chunks)
        # (c) prefix prefill: the prefixes under way, then new groups in plan order.
        for gid in self._active:
            prefix = self._groups[gid].prefix
            if budget and prefix is not None and prefix.num_pending:
                n = min(prefix.num_pending, budget)
                chunks.append(self._run(prefix, n))
                budget -= n
        while budget and (self._pending or self._take_from_source()):
            group = self._groups[self._pending[0]]
            pledge = max(self._estimate_pages[i] for i in group.waiting)
            if self._reserved + group.prefix_pages + pledge > self._budgets.kv_budget_pages:
                break
            self._pending.popleft()
            group.pledge_pages = pledge
            self._active[group.group_id] = None
            self._reserved += group.reserved_pages
            if group.prefix is not None:
                n = min(group.prefix.num_pending, budget)
                chunks.append(self._run(group.prefix, n))
                budget -= n
            else:
                budget = self._admit_requests(group, budget, chunks)
        prefixes = self._attended_prefixes(chunks)
        step = StepPlan(
            self._step_index, tuple(chunks), prefixes, tuple(preempted), self._pool.num_allocated
        )
        self._step_index += 1
        self._counters.count_step(step)
        return step

    def complete(self, step: StepPlan, sampled: Sequence[SampledToken]) -> None:
        self._counters.output_tokens += len(sampled)
        for seq in apply_sampled(self._seqs, step, sampled):
            self._finish(self._groups[self._group_of_request[seq.seq_id]], seq)

    def resolve(self, sampled: Sequence[SampledToken]) -> None:
        for seq in resolve_sampled(self._seqs, sampled):
            group = self._groups[self._group_of_request[seq.seq_id]]
            if seq.seq_id in group.running:
                self._finish(group, seq)
            else:  # preempted while its last token was in flight: it waits, holding nothing
                group.waiting.remove(seq.seq_id)
                self._count_finished(group)

    def metrics(self) -> dict:
        return self._counters.as_dict(self._num_groups, self._optimal, self._plan_s)

    # -- internals -------------------------------------------------------------------------

    def _run(self, seq: Sequence_, n: int) -> ChunkWork:
        need = pages_for(seq.num_computed + n, self._page_size) - len(seq.pages)
        if need > 0:
            seq.pages.extend(self._pool.allocate(need))
        return make_chunk(seq, n, attends_prefix=seq.prefix_group is not None)

    def _set_running_pages(self, group: _GroupState, running_pages: int) -> None:
        self._reserved -= group.reserved_pages
        group.running_pages = running_pages
        self._reserved += group.reserved_pages

    def _admit_requests(self, group: _GroupState, budget: int, chunks: list[ChunkWork]) -> int:
        while budget and group.waiting:
            rid = group.waiting[0]
            seq = self._seqs[rid]
            before = group.reserved_pages
            after = group.prefix_pages + max(
                group.pledge_pages, group.running_pages + self._estimate_pages[rid]
            )
            if self._reserved - before + after > self._budgets.kv_budget_pages:
                break
            group.waiting.popleft()
            group.running[rid] = None
            seq.reserved_pages = self._estimate_pages[rid]
            self._set_running_pages(group, group.running_pages + seq.reserved_pages)
            n = min(seq.num_pending, budget)
            chunks.append(self._run(seq, n))
            budget -= n
        return budget

    def _reserve_decode_growth(self) -> list[int]:
        """Grows reservations that decoding outgrew; preempts latest groups over the budget."""
        for gid in self._active:
            group = self._groups[gid]
            grown = 0
            for rid in group.running:
                seq = self._seqs[rid]
                need = pages_for(seq.num_computed + 1, self._page_size)
                if seq.is_decoding and need > seq.reserved_pages:
                    grown += need - seq.reserved_pages
                    seq.reserved_pages = need
            if grown:
                self._set_running_pages(group, group.running_pages + grown)
        preempted: list[int] = []
        while self._reserved > self._budgets.kv_budget_pages:
            preempted.extend(self._preempt(next(reversed(self._active))))
        return preempted

    def _preempt(self, gid: int) -> list[int]:
        group = self._groups[gid]
        del self._active[gid]
        self._reserved -= group.reserved_pages
        victims = list(group.running)
        for rid in reversed(victims):
            seq = self._seqs[rid]
            self._pool.release(seq.drop_kv())
            # It outgrew its estimate once: from now on it reserves for its full length.
            self._estimate_pages[rid] = pages_for(
                len(seq.tokens) - seq.num_generated + seq.max_tokens, self._page_size
            )
            group.waiting.appendleft(rid)
        group.running.clear()
        group.running_pages = 0
        if group.prefix is not None:
            self._pool.release(group.prefix.drop_kv())
        self._pending.appendleft(gid)
        self._counters.num_preemptions += len(victims)
        self._counters.num_preempted_groups += 1
        return victims

    def _finish(self, group: _GroupState, seq: Sequence_) -> None:
        self._pool.release(seq.drop_kv())
        del group.running[seq.seq_id]
        self._set_running_pages(group, group.running_pages - seq.reserved_pages)
        seq.reserved_pages = 0
        self._count_finished(group)

    def _count_finished(self, group: _GroupState) -> None:
        """One more of the group's requests is done; the last one frees the group."""
        group.num_unfinished -= 1
        self._num_unfinished -= 1
        if group.num_unfinished:
            return
        if group.group_id in self._active:
            self._reserved -= group.reserved_pages
            del self._active[group.group_id]
            if group.prefix is not None:
                self._pool.release(group.prefix.drop_kv())
        else:  # preempted whole: its pages are already back
            self._pending.remove(group.group_id)

    def _attended_prefixes(self, chunks: Sequence[ChunkWork]) -> tuple[PrefixRef, ...]:
        seen: dict[int, None] = {}
        for c in chunks:
            if c.prefix_group is not None:
                seen[c.prefix_group] = None
        refs = []
        for gid in seen:
            prefix = self._groups[gid].prefix
            refs.append(PrefixRef(gid, prefix.page_table(), len(prefix.tokens)))
        return tuple(refs)
