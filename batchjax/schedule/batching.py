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

    @property
    def prefix_levels(self) -> int:
        """Shared segments in the longest chain a step may attend (at least 1): the cascade
        levels the executor lays out (`BucketTable.prefix_levels`)."""


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def check_kv_budget(requests: Sequence[SchedRequest], budgets: Budgets,
                    groups: Sequence[tuple] | None = None) -> None:
    """Raises `BudgetTooSmall` for the first group that cannot run alone in one KV budget.

    A group needs its shared segments' pages (each segment starts on a fresh page) plus the
    pages of its longest request's own part at `max_tokens`: less and it could never finish.
    `groups` are (group_id, prefix_token_ids, request_ids[, chain]) as `BatchLLMBatcher`
    takes them; without them (the baselines) each request is a unit with no prefix. Only
    lengths are read, so checking a whole job costs one pass over its requests.
    """
    page_size, limit = budgets.page_size, budgets.kv_budget_pages
    if groups is None:
        for i, r in enumerate(requests):
            worst = pages_for(len(r.prompt_token_ids) + r.max_tokens, page_size)
            if worst > limit:
                raise BudgetTooSmall(
                    f"request {i} needs {worst} pages at max_tokens, over the budget of "
                    f"{limit} pages of {page_size} tokens")
        return
    for group_id, prefix_tokens, request_ids, *rest in groups:
        prefix_len = len(prefix_tokens)
        chain = rest[0] if rest and rest[0] is not None else (
            ((group_id, prefix_len),) if prefix_len else ())
        chain_pages, start = 0, 0
        for _, end in chain:
            chain_pages += pages_for(end - start, page_size)
            start = end
        worst = max((pages_for(len(requests[i].prompt_token_ids) - prefix_len
                               + requests[i].max_tokens, page_size) for i in request_ids),
                    default=0)
        if chain_pages + worst > limit:
            raise BudgetTooSmall(
                f"group {group_id} needs {chain_pages} prefix pages + {worst} pages "
                f"for its longest request at max_tokens, over the budget of "
                f"{limit} pages of {page_size} tokens")


@dataclasses.dataclass(eq=False, slots=True)
class Sequence_:
    """Mutable run-time state of one sequence: a request, or a group's shared prefix.

    `tokens` is the own part known so far (a request: its prompt after the group prefix, then
    what it generated; a shared segment: its tokens). The first `num_computed` have KV in
    `pages` (`table`: the same pages as the tuple its chunks carry, made again only when the
    pages change, not for every chunk). It attends the segments of `chain` (top-level first),
    `prefix_len` tokens in all.
    """

    seq_id: int
    tokens: list[int]
    max_tokens: int
    prefix_len: int = 0
    chain: tuple[int, ...] = ()
    pages: list[int] = dataclasses.field(default_factory=list)
    table: tuple[int, ...] = ()
    num_computed: int = 0
    num_generated: int = 0
    reserved_pages: int = 0
    finished: bool = False

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing its KV: the next chunk is one decode token."""
        return self.num_generated > 0 and len(self.tokens) - self.num_computed == 1

    def add_pages(self, pages: list[int]) -> None:
        self.pages.extend(pages)
        self.table = tuple(self.pages)

    def drop_kv(self) -> list[int]:
        """Forget the computed KV (preemption); returns the pages to hand back."""
        pages, self.pages, self.table = self.pages, [], ()
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


def make_chunk(seq: Sequence_, num_tokens: int) -> ChunkWork:
    """The next `num_tokens` of `seq`, attending its chain; its pages must already cover
    them. Called once per chunk, hundreds of times a decode step, so it reads the fields once
    and passes them by position."""
    start, tokens, chain = seq.num_computed, seq.tokens, seq.chain
    end = start + num_tokens
    sample = end == len(tokens) and seq.seq_id >= 0  # a request's last known token
    return ChunkWork(
        seq.seq_id,
        (tokens[start],) if num_tokens == 1 else tuple(tokens[start:end]),
        start,
        seq.table,
        chain[-1] if chain else None,
        seq.prefix_len,
        sample,
        sample and num_tokens == 1 and seq.num_generated > 0,  # a decode token
        chain,
    )


def decode_chunks(seqs: Sequence[Sequence_]) -> list[ChunkWork]:
    """`make_chunk(seq, 1)` for each of `seqs`, requests of one group (one chain, one prefix
    length) that decode next, made in one pass: a decode step makes hundreds."""
    if not seqs:
        return []
    chain, prefix_len = seqs[0].chain, seqs[0].prefix_len
    group = chain[-1] if chain else None
    return [ChunkWork(s.seq_id, (s.tokens[-1],), s.num_computed, s.table, group, prefix_len,
                      True, True, chain) for s in seqs]


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
            seq.num_computed += len(chunk.token_ids)
    finished = []
    for token in sampled:
        seq = seqs[token.seq_id]
        seq.tokens.append(token.token_id)
        seq.num_generated += 1
        if token.finished:
            seq.finished = True
            finished.append(seq)
    return finished


# A chain as the plan gives it: (segment id, end), top-level first; segment k holds the
# prefix's tokens from the previous end (0) to its own.
Chain = tuple[tuple[int, int], ...]


@dataclasses.dataclass(eq=False, slots=True)
class _SegmentState:
    """A shared segment at run time. It is resident (its pages reserved, computed or under
    way) from the admission of the first group below it until its last request below is done,
    unless preemption or a stalled admission drops it first (it is then recomputed)."""

    seq: Sequence_  # its tokens; `seq.chain` holds its ancestors (as many as its level)
    pages: int
    resident: bool = False
    active: int = 0  # admitted groups below it
    unfinished: int = 0  # unfinished requests below it
    ref: PrefixRef | None = None  # as the last step that attended it saw it

    def prefix_ref(self, seg_id: int) -> PrefixRef:
        """The segment as a step attends it: made again only when its pages changed."""
        table = self.seq.table
        if self.ref is None or self.ref.page_table is not table:
            self.ref = PrefixRef(seg_id, table, len(self.seq.tokens), len(self.seq.chain))
        return self.ref


@dataclasses.dataclass(eq=False, slots=True)
class _GroupState:
    """A plan group (requests that join the same deepest segment) at run time. Its own
    reservation is `max(pledge, running)`, the segments of its chain reserve theirs once
    however many groups use them: the pledge keeps room for one of its requests, so an
    admitted group can always progress."""

    group_id: int
    chain: tuple[int, ...]  # segment ids, top-level first
    request_ids: tuple[int, ...]
    waiting: collections.deque[int]
    running: dict[int, Sequence_]  # by request id, in admission order
    pledge_pages: int = 0
    running_pages: int = 0
    num_unfinished: int = 0

    @property
    def reserved_pages(self) -> int:
        return max(self.pledge_pages, self.running_pages)


class BatchLLMBatcher:
    """Groups in plan order; each step: decode, then suffixes of computed groups, then segments.

    Admission is by KV memory only: a request reserves pages for its own prompt part plus its
    decode estimate (`decode_estimate`, else `max_tokens`); each shared segment adds its pages
    once, however many groups below it run. A segment is computed once its parent is, and
    freed when the last request below it finishes. When decoding outgrows a reservation and
    the budget would be exceeded, the most recently admitted group is preempted whole (its KV
    dropped and recomputed later, with the segments no other running group uses); its
    requests keep what they generated and reserve for their full `max_tokens` from then on.
    Single-level sharing is the case of chains of one segment.
    """

    def __init__(
        self,
        requests: Sequence[SchedRequest],
        groups: Sequence[tuple],
        budgets: Budgets,
        *,
        policy: str = "batchllm",
        optimal_saving_ratio: float = 0.0,
        plan_s: float = 0.0,
        source: "GroupSource | None" = None,
    ):
        """`groups`: (group_id, prefix_token_ids, request_ids in run order[, chain]), in run
        order. `chain` ((segment id, end), top-level first; `Plan.group_work`) splits the
        prefix into shared segments; without it a group's whole prefix is one segment, whose
        id is the group's.

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
        self._levels = 0
        self._seqs: dict[int, Sequence_] = {}
        self._groups: dict[int, _GroupState] = {}
        self._segments: dict[int, _SegmentState] = {}
        self._estimate_pages: dict[int, int] = {}
        self._group_of_request: dict[int, int] = {}
        self._pending: collections.deque[int] = collections.deque()
        self._num_unfinished = 0
        for group in groups:
            self._add_group(*group)
        if source is None and sorted(self._group_of_request) != list(range(len(requests))):
            raise ValueError("the plan's groups must cover every request exactly once")
        self._active: dict[int, None] = {}  # admission order: the last one is preempted first
        self._finishing: set[int] = set()  # segments whose last chunk is in the step planned now
        self._reserved = 0
        self._step_index = 0

    def _add_segments(self, group_id: int, prefix_tokens, chain: Chain) -> tuple[int, ...]:
        """Registers the chain's segments (once each); returns their ids."""
        ids: list[int] = []
        start = 0
        for seg_id, end in chain:
            seg = self._segments.get(seg_id)
            if seg is None:
                if not start < end <= len(prefix_tokens):
                    raise ValueError(f"group {group_id}'s chain has segment {seg_id} ending at "
                                     f"{end}, after {start}, in a prefix of {len(prefix_tokens)}")
                seq = Sequence_(prefix_seq_id(seg_id), list(prefix_tokens[start:end]), 0,
                                start, tuple(ids))
                seg = _SegmentState(seq, pages_for(end - start, self._page_size))
                self._segments[seg_id] = seg
                self._seqs[seq.seq_id] = seq
            elif (seg.seq.chain != tuple(ids) or seg.seq.prefix_len != start
                  or tuple(seg.seq.tokens) != tuple(prefix_tokens[start:end])):
                raise ValueError(f"group {group_id}'s chain disagrees with segment {seg_id} "
                                 f"as an earlier group gave it")
            ids.append(seg_id)
            start = end
        if start != len(prefix_tokens):
            raise ValueError(f"group {group_id}'s chain covers {start} of its "
                             f"{len(prefix_tokens)} prefix tokens")
        return tuple(ids)

    def _add_group(self, group_id: int, prefix_tokens, request_ids,
                   chain: Chain | None = None) -> None:
        """Registers a group at the end of the run order."""
        budgets, requests = self._budgets, self._requests
        prefix_len = len(prefix_tokens)
        if group_id in self._groups:
            raise ValueError(f"group {group_id} was given twice")
        if chain is None:
            chain = ((group_id, prefix_len),) if prefix_len else ()
        for i in request_ids:
            r = requests[i]
            if tuple(r.prompt_token_ids[:prefix_len]) != tuple(prefix_tokens):
                raise ValueError(f"request {i} does not start with group {group_id}'s prefix")
            if len(r.prompt_token_ids) <= prefix_len:
                raise ValueError(f"request {i} has no tokens after group {group_id}'s prefix")
            if i in self._group_of_request:
                raise ValueError(f"request {i} is in two groups")
        seg_ids = self._add_segments(group_id, prefix_tokens, chain)
        check_kv_budget(requests, budgets, ((group_id, prefix_tokens, request_ids, chain),))
        group = _GroupState(group_id, seg_ids, tuple(request_ids), collections.deque(request_ids),
                            {}, num_unfinished=len(request_ids))
        for i in request_ids:
            r = requests[i]
            own = list(r.prompt_token_ids[prefix_len:])
            self._group_of_request[i] = group_id
            self._seqs[i] = Sequence_(i, own, r.max_tokens, prefix_len, seg_ids)
            estimate = r.max_tokens if r.decode_estimate is None else r.decode_estimate
            self._estimate_pages[i] = pages_for(len(own) + int(estimate), self._page_size)
        for s in seg_ids:
            self._segments[s].unfinished += len(request_ids)
        self._levels = max(self._levels, len(seg_ids))
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
        self._finishing.clear()  # (a preemption below may drop a segment finished last step)
        decoding, prefilling = self._running_by_phase()
        preempted = self._reserve_decode_growth(decoding)
        budget = self._budgets.max_tokens_per_step
        chunks: list[ChunkWork] = []
        # (a) one decode token for every running request.
        for gid in self._active:
            seqs = decoding[gid][:budget]
            for seq in seqs:
                self._cover(seq, 1)
            chunks += decode_chunks(seqs)
            budget -= len(seqs)
        # (b) suffix prefill of groups whose segments are computed: running chunks first.
        for gid in self._active:
            group = self._groups[gid]
            if not self._chain_ready(group):
                continue
            for seq in prefilling[gid]:
                if not budget:
                    break
                n = min(seq.num_pending, budget)
                chunks.append(self._run(seq, n))
                budget -= n
            budget = self._admit_requests(group, budget, chunks)
        # (c) segment prefill: the segments under way, then new groups in plan order. A
        # segment whose last chunk is in this step has its children start in it too (a step
        # writes its keys layer by layer before any of its attention reads them), and so do
        # the requests below a chain finishing in it.
        scheduled: set[int] = set()
        for gid in self._active:
            group = self._groups[gid]
            if not self._chain_ready(group):
                budget = self._advance_chain(group, budget, chunks, scheduled)
                if self._chain_ready(group):
                    budget = self._admit_requests(group, budget, chunks)
        while budget and (self._pending or self._take_from_source()):
            group = self._groups[self._pending[0]]
            pledge = max(self._estimate_pages[i] for i in group.waiting)
            need = pledge + sum(self._segments[s].pages for s in group.chain
                                if not self._segments[s].resident)
            if self._reserved + need > self._budgets.kv_budget_pages:
                if not self._active and self._drop_idle_segments(keep=group.chain):
                    continue
                break
            self._pending.popleft()
            group.pledge_pages = pledge
            self._active[group.group_id] = None
            for s in group.chain:
                seg = self._segments[s]
                seg.active += 1
                if not seg.resident:
                    seg.resident = True
                    self._reserved += seg.pages
            self._reserved += group.reserved_pages
            if not self._chain_ready(group):
                budget = self._advance_chain(group, budget, chunks, scheduled)
            if self._chain_ready(group):
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
        m = self._counters.as_dict(self._num_groups, self._optimal, self._plan_s)
        m["prefix_levels"] = self._levels
        m["num_prefix_nodes"] = len(self._segments)
        # Pages still allocated when read: 0 after a finished run, every segment freed.
        m["kv_pages_at_end"] = self._pool.num_allocated
        return m

    @property
    def prefix_levels(self) -> int:
        """Segments in the longest chain of the groups registered so far (at least 1)."""
        return max(1, self._levels)

    @property
    def kv_pages_in_use(self) -> int:
        """Pages allocated now: 0 once every request has finished."""
        return self._pool.num_allocated

    # -- internals -------------------------------------------------------------------------

    def _run(self, seq: Sequence_, n: int) -> ChunkWork:
        self._cover(seq, n)
        return make_chunk(seq, n)

    def _cover(self, seq: Sequence_, n: int) -> None:
        """Pages for the next `n` tokens of `seq`. Most calls are decode tokens whose last
        page has room: one comparison, no page arithmetic."""
        end = seq.num_computed + n
        if end > len(seq.pages) * self._page_size:
            seq.add_pages(self._pool.allocate(pages_for(end, self._page_size) - len(seq.pages)))

    def _chain_ready(self, group: _GroupState) -> bool:
        """Every segment of the group's chain computed, or finishing in the step planned now."""
        return all(self._segments[s].seq.num_pending == 0 or s in self._finishing
                   for s in group.chain)

    def _advance_chain(self, group: _GroupState, budget: int, chunks: list[ChunkWork],
                       scheduled: set[int]) -> int:
        """Chunks of the group's segments still to compute, top first: a segment's next chunk
        once its parent is computed or finishes in this step, unless another group scheduled
        that segment in this step."""
        for s in group.chain:
            seq = self._segments[s].seq
            if not seq.num_pending or s in self._finishing:
                continue
            if budget and s not in scheduled:
                n = min(seq.num_pending, budget)
                chunks.append(self._run(seq, n))
                budget -= n
                scheduled.add(s)
                if n == seq.num_pending:  # its last chunk: its child may start now
                    self._finishing.add(s)
                    continue
            break
        return budget

    def _release_segment(self, seg: _SegmentState) -> None:
        self._pool.release(seg.seq.drop_kv())
        if seg.resident:
            seg.resident = False
            self._reserved -= seg.pages

    def _drop_idle_segments(self, keep: tuple[int, ...]) -> bool:
        """With no group running, drops resident segments outside `keep` (they are recomputed
        when their groups come), so that the next group in order can start; False if none."""
        idle = [seg for s, seg in self._segments.items()
                if seg.resident and seg.active == 0 and s not in keep]
        for seg in idle:
            self._release_segment(seg)
        return bool(idle)

    def _set_running_pages(self, group: _GroupState, running_pages: int) -> None:
        self._reserved -= group.reserved_pages
        group.running_pages = running_pages
        self._reserved += group.reserved_pages

    def _admit_requests(self, group: _GroupState, budget: int, chunks: list[ChunkWork]) -> int:
        while budget and group.waiting:
            rid = group.waiting[0]
            seq = self._seqs[rid]
            before = group.reserved_pages
            after = max(group.pledge_pages, group.running_pages + self._estimate_pages[rid])
            if self._reserved - before + after > self._budgets.kv_budget_pages:
                break
            group.waiting.popleft()
            group.running[rid] = seq
            seq.reserved_pages = self._estimate_pages[rid]
            self._set_running_pages(group, group.running_pages + seq.reserved_pages)
            n = min(seq.num_pending, budget)
            chunks.append(self._run(seq, n))
            budget -= n
        return budget

    def _running_by_phase(self) -> tuple[dict[int, list[Sequence_]], dict[int, list[Sequence_]]]:
        """Each active group's running requests that decode next (one token: the last one
        sampled), and those with prompt tokens left, in admission order: a step walks all its
        running requests once."""
        decoding: dict[int, list[Sequence_]] = {}
        prefilling: dict[int, list[Sequence_]] = {}
        for gid in self._active:
            decoding[gid], prefilling[gid] = dec, pre = [], []
            for seq in self._groups[gid].running.values():
                if seq.is_decoding:
                    dec.append(seq)
                elif seq.num_pending:
                    pre.append(seq)
        return decoding, prefilling

    def _reserve_decode_growth(self, decoding: dict[int, list[Sequence_]]) -> list[int]:
        """Grows reservations that decoding outgrew; preempts latest groups over the budget."""
        for gid, seqs in decoding.items():
            grown = 0
            for seq in seqs:
                # Only a token past its reserved pages grows the reservation.
                if seq.num_computed >= seq.reserved_pages * self._page_size:
                    need = pages_for(seq.num_computed + 1, self._page_size)
                    grown += need - seq.reserved_pages
                    seq.reserved_pages = need
            if grown:
                group = self._groups[gid]
                self._set_running_pages(group, group.running_pages + grown)
        preempted: list[int] = []
        while self._reserved > self._budgets.kv_budget_pages and self._active:
            preempted.extend(self._preempt(next(reversed(self._active))))
        return preempted

    def _preempt(self, gid: int) -> list[int]:
        group = self._groups[gid]
        del self._active[gid]
        self._reserved -= group.reserved_pages
        victims = list(group.running)
        for rid in reversed(victims):
            seq = group.running[rid]
            self._pool.release(seq.drop_kv())
            # It outgrew its estimate once: from now on it reserves for its full length.
            self._estimate_pages[rid] = pages_for(
                len(seq.tokens) - seq.num_generated + seq.max_tokens, self._page_size
            )
            group.waiting.appendleft(rid)
        group.running.clear()
        group.running_pages = 0
        for s in group.chain:
            self._segments[s].active -= 1
        for s in reversed(group.chain):  # what no running group uses goes with it
            seg = self._segments[s]
            if seg.active == 0 and seg.resident:
                self._release_segment(seg)
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
        """One more of the group's requests is done; a segment goes with its last request."""
        group.num_unfinished -= 1
        self._num_unfinished -= 1
        for s in group.chain:
            self._segments[s].unfinished -= 1
        if group.num_unfinished:
            return
        if group.group_id in self._active:
            self._reserved -= group.reserved_pages
            del self._active[group.group_id]
            for s in group.chain:
                self._segments[s].active -= 1
        else:  # preempted whole: its pages are already back
            self._pending.remove(group.group_id)
        for s in group.chain:
            seg = self._segments[s]
            if seg.unfinished == 0:
                self._release_segment(seg)

    def _attended_prefixes(self, chunks: Sequence[ChunkWork]) -> tuple[PrefixRef, ...]:
        """Every segment the chunks attend, in the order they first appear."""
        seen: dict[int, None] = {}
        last = None
        for c in chunks:
            # A group's chunks mostly follow each other and carry its one chain object.
            if c.prefix_chain is not last:
                last = c.prefix_chain
                for s in last:
                    seen[s] = None
        return tuple(self._segments[s].prefix_ref(s) for s in seen)
