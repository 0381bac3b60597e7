"""The engine: requests in, every completion out, through a policy's batcher and the model step.

Planning decides, the engine executes: each step the batcher emits a `StepPlan`, the engine lays
it out as a `StepBatch`, runs the jitted step, and reports the sampled tokens back. Host state per
request (generated tokens, detokenizer, stop logic) lives here; page ids live in the batcher.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from batchjax.engine.page_pool import (allocate_kv, check_kv_fits, kv_bytes_per_page,
                                       pages_for_budget)
from batchjax.engine.results import Result, SampleCollector, TokenLogprob, error_result
from batchjax.engine.sampling import sampling_row_arrays
from batchjax.engine.step import ModelStep, StepVariant
from batchjax.engine.step_batch import build_step_batch
from batchjax.engine.stopping import StopChecker
from batchjax.models.flops import forward_flops
from batchjax.models.tokenizer import IncrementalDetokenizer
from batchjax.requests import (InvalidRequestError, Request, RequestError, SamplingParams,
                               requests_from_python, sample_requests)
from batchjax.metrics import process_age_s
from batchjax.schedule.buckets import BucketTable
from batchjax.sharding import rules
from batchjax.sharding.mesh import describe, make_mesh
from batchjax.schedule.driver import run_batcher
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.step_plan import Budgets, SampledToken, SchedRequest, placeholder_token

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Everything that shapes a run besides the requests and the policy."""

    dtype: str = "float32"
    attention: str = "xla"
    # Dense products and paged attention rows: "auto" takes the native CPU kernels where they
    # run (x86-64 AVX2/FMA, f32), "native" insists on them, "xla" keeps XLA's own code
    # (see batchjax.kernels).
    cpu_kernels: str = "auto"
    page_size: int = 16
    kv_budget_mb: float = 1024.0
    max_tokens_per_step: int = 512
    max_num_seqs: int = 256  # request cap of the `none`/`vllm`/`sglang` baselines
    # `batchllm`: the most shared segments in a request's chain (multi-level sharing; 1 is
    # BatchLLM's single level), and the least tokens a segment must save to be kept.
    prefix_levels: int = 4
    min_saved_tokens: int = 16
    # Plan and launch step N+1 while step N runs (its tokens come back one step late); the
    # results are the same either way.
    overlap: bool = True
    # Tensor parallel: where the embedding table and the LM head are split, "TABLE/HEAD"
    # (`batchjax.sharding.rules`; a mesh of one splits nothing).
    placement: str = "/".join(rules.DEFAULT_PLACEMENT)
    progress: bool = True
    # XLA programs persist here across processes (a rerun skips compilation); "" turns it off.
    compilation_cache_dir: str = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "batchjax", "xla")


def _enable_compilation_cache(path: str) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def dtype_of(name: str):
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class _Live:
    """Host state of one running request (one sample of it, with `n` > 1)."""

    def __init__(self, request: Request, prompt_ids: tuple[int, ...], tokenizer,
                 eos_token_ids: tuple[int, ...], max_model_len: int, matcher=None):
        s = request.sampling
        self.request = request
        self.prompt_ids = prompt_ids
        self.generated: list[int] = []
        self.tokenizer = tokenizer
        # While it runs, its text matters only to find stop strings: a request without any is
        # detokenized once it has finished (`result`, on the results thread), off the loop.
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None and s.stop \
            else None
        # A request that only scores its prompt runs as if it generated one token, dropped.
        self.scores_only = not s.generates
        stop_sampling = s if s.generates else dataclasses.replace(s, max_tokens=1)
        self._stop_args = (stop_sampling, eos_token_ids, max_model_len, len(prompt_ids))
        self.stop = StopChecker(*self._stop_args)
        self.cached_prompt_tokens: int | None = None
        self.finish = None
        self.scheduled = 0  # tokens sampled for it so far, collected or still in flight
        self.logprobs: list[TokenLogprob] | None = [] if s.logprobs is not None else None
        # Prompt logprobs: the first scored prompt position, and one entry per prompt token.
        self.score_from = None if s.prompt_logprobs is None else (request.score_from or 1)
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            None if self.score_from is None else [None] * len(prompt_ids))
        self.matcher = matcher  # the grammar of a structured request (batchjax.engine.grammar)

    @property
    def logits_from(self) -> int | None:
        """The first position whose logits it needs before its last prompt token."""
        return None if self.score_from is None else self.score_from - 1

    def score_range(self) -> tuple[int, int] | None:
        """Model positions [lo, hi) whose logits score its prompt tokens, if it has any."""
        if self.score_from is None or self.score_from >= len(self.prompt_ids):
            return None
        return self.score_from - 1, len(self.prompt_ids) - 1

    def add(self, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        self.generated.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.matcher is not None and not self.matcher.is_finished:
            self.matcher.consume(token_id)
        new_text = self.detok.add(token_id) if self.detok is not None else ""
        self.finish = self.stop.update(token_id, new_text)
        return self.finish is not None

    def add_prompt_logprob(self, position: int, logprob: TokenLogprob) -> None:
        """The logprob of prompt token `position` (recomputed after a preemption: kept once)."""
        if self.prompt_logprobs[position] is None:
            self.prompt_logprobs[position] = logprob

    @property
    def completion_tokens(self) -> int:
        """Tokens its result reports, once finished."""
        return 0 if self.scores_only else self.finish.num_tokens

    def _finish_with_text(self):
        """Its finish decision with the text: the one taken while it ran, or, where the text was
        left for later, the same decision taken again over its tokens with their text."""
        if self.detok is not None or self.tokenizer is None:
            return self.finish
        detok, stop = IncrementalDetokenizer(self.tokenizer), StopChecker(*self._stop_args)
        for token_id in self.generated:
            decision = stop.update(token_id, detok.add(token_id))
        assert decision == dataclasses.replace(self.finish, text=decision.text), (
            "a finish decided by token ids alone changed with the text")
        return decision

    def result(self) -> Result:
        """Its result, once finished (detokenizes it if that was left for later)."""
        f = self._finish_with_text()
        r = self.request
        n = self.completion_tokens
        text = f.text if self.tokenizer is not None else None
        return Result(
            id=r.id,
            index=r.index,
            text="" if self.scores_only and text is not None else text,
            token_ids=tuple(self.generated[:n]),
            finish_reason=f.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=n,
            cached_prompt_tokens=self.cached_prompt_tokens or 0,
            error=None,
            logprobs=None if self.logprobs is None else tuple(self.logprobs[:n]),
            prompt_logprobs=None if self.prompt_logprobs is None else tuple(self.prompt_logprobs),
            sample=None if r.sampling.n == 1 else (r.input_index, r.sample_index, r.sampling.n),
        )


@dataclasses.dataclass(frozen=True)
class Score:
    """A continuation's score given its context (`Engine.score`): the sum of its tokens'
    logprobs, whether each token is the argmax at its position (the greedy continuation),
    and the per-token logprobs."""

    logprob: float
    is_greedy: bool
    num_tokens: int
    token_logprobs: tuple[float, ...]


def _error_result(request: Request, field: str | None, message: str) -> Result:
    return error_result(RequestError(line=request.index + 1, id=request.id, field=field,
                                     message=message))


def step_flops(config, batch) -> float:
    """Useful matmul FLOPs of a laid-out step (`StepBatch`): its real tokens, each over the
    keys it attends (a token at position p attends p + 1), and its logits rows."""
    return forward_flops(config, batch.positions[: batch.num_tokens] + 1,
                         batch.num_logits_rows)


class RequestPreparer:
    """Validates and tokenizes requests for a model: what a driver needs of an engine without
    its weights (`Engine` is one; the Ray driver holds one of its own)."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.max_model_len = config.max_position_embeddings
        self._grammar = None  # a GrammarCompiler, built for the first structured request

    def _prompt_ids(self, request: Request) -> tuple[int, ...]:
        if request.prompt_token_ids is not None:
            bad = [t for t in request.prompt_token_ids if t >= self.config.vocab_size]
            if bad:
                raise InvalidRequestError("prompt_token_ids",
                               f"token id {bad[0]} is outside the vocabulary of "
                               f"{self.config.vocab_size}")
            return request.prompt_token_ids
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer: give prompt_token_ids")
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(list(request.messages))
            return tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return tuple(self.tokenizer.encode(request.prompt))

    def _matcher(self, request: Request):
        """A fresh grammar matcher for a structured request (None for any other)."""
        spec = request.sampling.structured
        if spec is None:
            return None
        if self.tokenizer is None:
            raise InvalidRequestError("structured", "this model has no tokenizer to constrain")
        if self._grammar is None:
            from batchjax.engine.grammar import GrammarCompiler  # only structured jobs need it

            self._grammar = GrammarCompiler(self.tokenizer, self.config.vocab_size)
        try:
            return self._grammar.compile(spec)
        except ValueError as e:
            raise InvalidRequestError("structured", f"cannot be compiled: {e}") from None

    def _live(self, request: Request, ids: tuple[int, ...], matcher) -> _Live:
        eos = () if request.sampling.ignore_eos else self.config.eos_token_ids
        return _Live(request, ids, self.tokenizer, eos, self.max_model_len, matcher)

    def prepare_one(self, request: Request) -> _Live | Result:
        try:
            ids = self._prompt_ids(request)
            matcher = self._matcher(request)
        except InvalidRequestError as e:
            return _error_result(request, e.field, e.reason)
        if len(ids) >= self.max_model_len:
            field = "messages" if request.messages is not None else (
                "prompt" if request.prompt is not None else "prompt_token_ids")
            return _error_result(
                request, field,
                f"prompt has {len(ids)} tokens; the model context is {self.max_model_len}")
        if request.score_from is not None and request.score_from >= len(ids):
            return _error_result(request, "score_from", f"must be below the prompt's "
                                                        f"{len(ids)} tokens")
        return self._live(request, ids, matcher)

    def _samples(self, first: _Live, first_free_index: int) -> list[_Live]:
        """The other samples of `first`'s request (n > 1): the same prompt, fresh state."""
        return [self._live(r, first.prompt_ids, self._matcher(r))
                for r in sample_requests(first.request, first_free_index)]

    def prepare(self, requests, *, sampling: SamplingParams | None = None,
                on_result: Callable[[Result], None] | None = None,
                skip_ids: frozenset[str] = frozenset()) -> tuple[list["_Live"], dict]:
        """Validates and tokenizes: (the requests to run, in input order; results so far by
        input index: the bad requests' errors, also passed to `on_result`)."""
        reqs = requests_from_python(list(requests), default_sampling=sampling)
        done: dict[int, Result] = {}
        live: list[_Live] = []
        free_index = len(reqs)  # the indices samples after the first run under
        for r in reqs:
            if r.id in skip_ids:
                continue
            prepared = self.prepare_one(r)
            if isinstance(prepared, Result):
                done[r.index] = prepared
                if on_result is not None:
                    on_result(prepared)
            else:
                live.append(prepared)
                if r.sampling.n > 1:
                    live.extend(self._samples(prepared, free_index))
                    free_index += r.sampling.n - 1
        return live, done

    @staticmethod
    def sched_requests(live: Sequence["_Live"]) -> list[SchedRequest]:
        """What the schedule sees of each request: its prompt, its token limit, and the
        first position whose logits it needs."""
        return [SchedRequest(st.prompt_ids, st.stop.token_limit, logits_from=st.logits_from)
                for st in live]


class Engine(RequestPreparer):
    """A loaded model and its KV pools, reusable for many `generate` calls."""

    def __init__(self, model: str = "smollm2-135m", *, policy: str = "batchllm",
                 tensor_parallel: int = 1, mesh=None, loaded=None, **options):
        """`mesh`: the `[1, T]` mesh of devices this engine runs on (`batchjax.sharding.mesh`;
        default: the first `tensor_parallel` devices); `loaded`: the model already loaded by
        `batchjax.models.registry.load_model` (replicas share one load). One engine is one
        data-parallel replica; `batchjax.cluster.Engine` runs several."""
        from batchjax.models.registry import load_model  # heavy: keep `import batchjax` light

        if mesh is None:  # checked before anything loads
            mesh = make_mesh(tensor_parallel, 1)
        elif mesh.devices.shape[1] != tensor_parallel and tensor_parallel != 1:
            raise ValueError(f"tensor_parallel={tensor_parallel} but the mesh given is "
                             f"{describe(mesh)}")
        self.options = EngineOptions(**options)
        placement = rules.placement_rules(*rules.parse_placement(self.options.placement))
        dtype = dtype_of(self.options.dtype)
        self.policy = policy
        _enable_compilation_cache(self.options.compilation_cache_dir)
        if loaded is None:  # across processes, each reads only its devices' slices
            loaded = load_model(model, dtype=dtype, mesh=mesh)
        self.model_source = model
        self.weight_bytes_read = loaded.bytes_read
        RequestPreparer.__init__(self, loaded.config, loaded.tokenizer)
        o = self.options
        # The step keeps its own stacked copy of the parameters (laid out on `mesh`); the
        # module itself is dropped.
        self.step = ModelStep(loaded.model, o.attention, o.cpu_kernels, mesh=mesh,
                              sharding_rules=placement)
        self.mesh = self.step.mesh
        kv_heads = self.step.layout.pool_kv_heads
        self.kv_budget_pages = pages_for_budget(self.config, o.page_size, dtype, o.kv_budget_mb,
                                                kv_heads)
        if self.kv_budget_pages < 1:
            raise ValueError(f"kv_budget_mb={o.kv_budget_mb} holds no page of KV for this model")
        check_kv_fits(self.kv_budget_pages,
                      kv_bytes_per_page(self.config, o.page_size, dtype, kv_heads),
                      self.mesh.devices.flat, o.kv_budget_mb)
        self.kv = allocate_kv(self.config, self.kv_budget_pages, o.page_size, dtype, kv_heads,
                              self.step.kv_sharding)
        self.last_metrics: dict[str, Any] = {}

    # -- running ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Iterable[str | dict | Request],
        *,
        policy: str | None = None,
        sampling: SamplingParams | None = None,
        on_result: Callable[[Result], None] | None = None,
        skip_ids: frozenset[str] = frozenset(),
        prefix_levels: int | None = None,
    ) -> list[Result]:
        """Every request's result, in input order; bad requests get an error result.
        `prefix_levels` overrides the engine's option for this call (`batchllm`)."""
        policy = policy or self.policy
        t0 = time.perf_counter()
        samples = SampleCollector()
        on_result = samples.wrap(on_result)
        live, done = self.prepare(requests, sampling=sampling, on_result=on_result,
                                  skip_ids=skip_ids)
        sched = self.sched_requests(live)
        batcher = make_batcher(policy, sched, self.budgets(),
                               **self.plan_options(policy, prefix_levels)) if live else None
        self.last_metrics = self.run(live, batcher, done, on_result=on_result, t0=t0,
                                     policy=policy)
        return samples.results(done)

    def score(self, pairs: Iterable[tuple[str | Sequence[int], str | Sequence[int]]], *,
              policy: str | None = None) -> list[Score]:
        """Each (context, continuation) pair's `Score`, in order, in one job (`score_pairs`)."""
        return score_pairs(self, pairs, policy=policy)

    def plan_options(self, policy: str, prefix_levels: int | None = None) -> dict:
        """What `make_batcher` takes for `policy` besides the requests and budgets."""
        o = self.options
        if policy != "batchllm":
            return {}
        return {"prefix_levels": o.prefix_levels if prefix_levels is None else prefix_levels,
                "min_saved_tokens": o.min_saved_tokens}

    def budgets(self) -> Budgets:
        o = self.options
        return Budgets(o.max_tokens_per_step, self.kv_budget_pages, o.page_size,
                       max_num_seqs=o.max_num_seqs)

    def run(self, live: Sequence["_Live"], batcher, done: dict[int, Result], *,
            on_result: Callable[[Result], None] | None = None, t0: float | None = None,
            policy: str | None = None, bar=None, all_live: Sequence["_Live"] | None = None,
            prefix_levels: int | None = None) -> dict[str, Any]:
        """Runs `batcher` over `live` to the end, filling `done`; returns the run's metrics.

        A data-parallel replica passes its share's batcher, the whole job's requests as
        `all_live` and the job plan's `prefix_levels` (the shapes it warms up are the job's,
        the same on every replica) and the job's progress `bar`.
        """
        t0 = time.perf_counter() if t0 is None else t0
        o = self.options
        all_live = all_live or live
        variant = step_variant([st.request.sampling for st in all_live])
        compiled_before = self.step.num_compiled_shapes
        stats = _RunStats()
        warmup_s = 0.0
        if live:
            job = self.sched_requests(all_live)
            if prefix_levels is None:  # the cascade levels the batcher's chains need
                prefix_levels = batcher.prefix_levels
            buckets = BucketTable.for_job(job, o.max_tokens_per_step, o.page_size,
                                          prefix_levels)
            t_warm = time.perf_counter()
            # Every shape this job's steps can take, compiled before its first step.
            feed = self.step.empty_feed(buckets.tokens[-1])
            self.step.warm_up(self.kv, feed, buckets.job_shapes(job, o.max_tokens_per_step),
                              variant, o.progress and bar is None)
            warmup_s = time.perf_counter() - t_warm
            warm = self.step.num_compiled_shapes
            steps = _EngineSteps(self, buckets, feed, live, variant, done, on_result, stats, bar)
            try:
                run_batcher(batcher, steps, overlap=o.overlap)
            except BaseException:
                steps.close(check=False)  # the loop's own error is the one to report
                raise
            steps.close()
            stats.compiled_after_warmup = self.step.num_compiled_shapes - warm
            metrics = dict(batcher.metrics())
        else:
            metrics = {"policy": policy or self.policy, "num_requests": 0}
        wall = time.perf_counter() - t0
        metrics.update(
            wall_s=wall,
            output_tokens=stats.output_tokens,
            finished_prompt_tokens=stats.prompt_tokens,
            busy_s=stats.loop_s,
            output_tokens_per_s=stats.output_tokens / wall if wall > 0 else 0.0,
            total_tokens_per_s=(stats.output_tokens + stats.prompt_tokens) / wall
            if wall > 0 else 0.0,
            num_compiled_shapes=self.step.num_compiled_shapes,
            new_compiled_shapes=self.step.num_compiled_shapes - compiled_before,
            compiled_after_warmup=stats.compiled_after_warmup,
            warmup_s=warmup_s,
            startup_s=stats.startup_s,
            time_to_first_result_s=stats.time_to_first_result_s,
            time_to_last_result_s=process_age_s(),  # process start to the end of this call
            failed_requests=sum(1 for r in done.values() if r.error is not None),
            model_tokens=stats.model_tokens,
            model_flops=stats.model_flops,  # divide by wall_s and a roofline for utilisation
            prefill_steps=stats.prefill_steps,
            prefill_s=stats.prefill_s,
            prefill_flops=stats.prefill_flops,
            decode_steps=stats.decode_steps,
            decode_s=stats.decode_s,
            decode_flops=stats.decode_flops,
            compiling_steps=stats.compiling_steps,
            compiling_s=stats.compiling_s,
            prefill_gflops_per_s=_rate(stats.prefill_flops / 1e9, stats.prefill_s),
            decode_gflops_per_s=_rate(stats.decode_flops / 1e9, stats.decode_s),
            host_s_per_step=_rate(stats.host_s, stats.num_steps),
            device_idle_s=stats.device_idle_s,
            device_idle_fraction=_rate(stats.device_idle_s, stats.loop_s),
            decode_device_idle_fraction=_rate(stats.decode_idle_s, stats.decode_span_s),
            padded_tokens=stats.padded_tokens,
            overlap=o.overlap,
            attention=o.attention,
            cpu_kernels=self.step.cpu_kernels,
            bf16_matmul=self.step.bf16_matmul,
            dtype=o.dtype,
            num_devices=self.mesh.devices.size,
            tensor_parallel=self.step.tensor_parallel,
            data_parallel=1,
        )
        return metrics


def score_pairs(engine, pairs: Iterable[tuple[str | Sequence[int], str | Sequence[int]]], *,
                policy: str | None = None) -> list[Score]:
    """Each (context, continuation) pair's `Score`, in order, in one job of `engine` (an
    `Engine`, or a `batchjax.cluster.Engine` of replicas).

    Token-id pairs are used as they are; a text pair is tokenized as one text, the context's
    trailing spaces moved to the continuation, and split where the context's own tokens end
    (as lm-evaluation-harness does). The context needs a token at least. Pairs that share a
    context are a prefix group: the context is computed once, and each continuation (with the
    context's last token, whose logits score its first token) on its own. Raises
    InvalidRequestError naming the pair for a bad one.
    """
    requests = []
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = _score_ids(engine.tokenizer, i, context, continuation)
        requests.append(Request(
            id=str(i), prompt=None, prompt_token_ids=ctx + cont, messages=None,
            sampling=SamplingParams(max_tokens=0, prompt_logprobs=0, ignore_eos=True),
            index=i, score_from=len(ctx)))
    scores = []
    for r in engine.generate(requests, policy=policy):
        if r.error is not None:
            raise InvalidRequestError(r.error.field, f"pair {r.index}: {r.error.message}")
        scored = [lp for lp in r.prompt_logprobs if lp is not None]
        scores.append(Score(
            logprob=float(sum(lp.logprob for lp in scored)),
            is_greedy=all(lp.token_id == lp.argmax for lp in scored),
            num_tokens=len(scored), token_logprobs=tuple(lp.logprob for lp in scored)))
    return scores


def _score_ids(tokenizer, i: int, context, continuation) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(context, str) != isinstance(continuation, str):
        raise InvalidRequestError(None, f"pair {i}: give both parts as text or both as ids")
    if isinstance(context, str):
        if tokenizer is None:
            raise InvalidRequestError(None, f"pair {i}: this model has no tokenizer")
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        ctx = tokenizer.encode(context, add_special_tokens=False)
        ctx, cont = tuple(whole[: len(ctx)]), tuple(whole[len(ctx):])
    else:
        ctx, cont = tuple(context), tuple(continuation)
    if not ctx:
        raise InvalidRequestError(None, f"pair {i}: the context has no tokens")
    if not cont:
        raise InvalidRequestError(None, f"pair {i}: the continuation has no tokens")
    return ctx, cont


def step_variant(params: Sequence[SamplingParams]) -> StepVariant:
    """The compiled step a job of requests with these sampling parameters runs."""
    wants = [p for p in params if p.logprobs is not None or p.prompt_logprobs is not None]
    return StepVariant(
        greedy=all(p.is_greedy for p in params),
        logprobs=bool(wants),
        processed=any(p.logprobs is not None and p.logprobs_mode == "processed" for p in wants),
        constrained=any(p.structured is not None for p in params))


def _rate(amount: float, seconds: float) -> float | None:
    return amount / seconds if seconds > 0 else None


@dataclasses.dataclass
class _RunStats:
    output_tokens: int = 0
    prompt_tokens: int = 0
    model_tokens: int = 0
    padded_tokens: int = 0
    model_flops: float = 0.0
    num_steps: int = 0
    # Steps that compute prompt tokens (alone or mixed with decode rows), decode-only ones,
    # and the steps of either kind that compiled a new shape first. A step's time runs from
    # the previous step's tokens being collected to its own.
    prefill_steps: int = 0
    prefill_s: float = 0.0
    prefill_flops: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_flops: float = 0.0
    compiling_steps: int = 0
    compiling_s: float = 0.0
    compiled_after_warmup: int = 0
    # Host time in the loop outside waiting for the device; device-idle time: from a step's
    # end on the device (as a watcher thread sees it, so at most late) to the launch of the
    # next one.
    host_s: float = 0.0
    loop_s: float = 0.0
    device_idle_s: float = 0.0
    decode_idle_s: float = 0.0  # between two decode-only steps ...
    decode_span_s: float = 0.0  # ... out of the time from the first's end to the second's
    startup_s: float | None = None  # process start to the first step's launch
    time_to_first_result_s: float | None = None  # process start to the first result

    def add_step(self, decode_only: bool, compiled: bool, flops: float, seconds: float) -> None:
        self.num_steps += 1
        if compiled:
            self.compiling_steps += 1
            self.compiling_s += seconds
        elif decode_only:
            self.decode_steps += 1
            self.decode_s += seconds
            self.decode_flops += flops
        else:
            self.prefill_steps += 1
            self.prefill_s += seconds
            self.prefill_flops += flops


class _ResultsThread:
    """Hands finished requests on as results, in the order they finished, from a thread of
    its own: their detokenization and `on_result` (the journal's fsynced writes) run while the
    step loop goes on. A failure there (a full disk) stops the handing on and is raised to the
    loop at its next `check`; what was handed on before it stays."""

    def __init__(self, done: dict[int, Result], on_result, stats: "_RunStats"):
        self._done, self._on_result, self._stats = done, on_result, stats
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="results")
        self._thread.start()

    def _run(self) -> None:
        while (st := self._queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                result = st.result()
                self._done[st.request.index] = result
                if self._on_result is not None:
                    self._on_result(result)
                if self._stats.time_to_first_result_s is None:
                    self._stats.time_to_first_result_s = process_age_s()
            except BaseException as e:  # noqa: BLE001 - raised again on the loop's thread
                self.error = e

    def put(self, st: _Live) -> None:
        self._queue.put(st)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, check: bool = True) -> None:
        """Waits for every result put so far to be handed on."""
        self._queue.put(None)
        self._thread.join()
        if check:
            self.check()


@dataclasses.dataclass
class _InFlight:
    """A launched step: its layout, its device outputs, and when it started and ended."""

    batch: Any
    tokens: jax.Array  # [Ss] int32 on the device
    reported: dict[str, jax.Array]  # what the step variant reports per logits row
    launched: float
    compiled: bool
    flops: float
    decode_only: bool
    ended: float = 0.0  # when the device had its tokens (set by the watcher)
    raw: jax.Array | None = None  # a split step's logits rows, until it is sampled
    sampling_rows: tuple = ()


class _EngineSteps:
    """The engine's `StepExecutor`: lays a plan out, runs the jitted step, and turns sampled
    tokens into per-request state, stop decisions and results."""

    def __init__(self, engine: "Engine", buckets: BucketTable, feed: jax.Array,
                 live: Sequence[_Live], variant: StepVariant, done: dict[int, Result], on_result,
                 stats: _RunStats, bar=None):
        self._engine, self._buckets, self._feed = engine, buckets, feed
        self._live, self._variant = live, variant
        self._results = _ResultsThread(done, on_result, stats)
        self._score_ranges = {i: r for i, st in enumerate(live)
                              if (r := st.score_range()) is not None}
        self._stats = stats
        self._own_bar = bar is None  # a replica of a data-parallel job shares the job's bar
        self._bar = bar if bar is not None else tqdm(
            total=len(live), unit="req", disable=not engine.options.progress, desc="generate",
            dynamic_ncols=True)
        self._t_start = time.perf_counter()
        self._last_collect = self._t_start
        self._waited = 0.0
        self._steps: list[_InFlight] = []  # every launched step, in order
        # A watcher thread notes when each step's tokens exist on the device, so device-idle
        # time is measured even while the host is busy elsewhere.
        self._watch: queue.Queue = queue.Queue()
        self._watcher = threading.Thread(target=self._watch_steps, daemon=True)
        self._watcher.start()

    def _watch_steps(self) -> None:
        while (step := self._watch.get()) is not None:
            step.tokens.block_until_ready()
            step.ended = time.perf_counter()

    def launch(self, plan) -> _InFlight:
        engine, live = self._engine, self._live
        for c in plan.chunks:
            if c.seq_id >= 0 and live[c.seq_id].cached_prompt_tokens is None:
                live[c.seq_id].cached_prompt_tokens = c.prefix_len + c.own_start
        batch = build_step_batch(plan, engine.options.page_size, self._buckets,
                                 self._score_ranges)
        sampled = [live[seq] for seq in batch.sample_seq_ids]
        rows = sampling_row_arrays(
            batch.logits_index.shape[0], [st.request.sampling for st in sampled],
            batch.sample_positions, [st.request.sample_index for st in sampled])
        compiled = engine.step.num_compiled_shapes
        if self._variant.split:
            # The forward pass now; the sampler once the grammar masks, which need the tokens
            # of the step before, are filled (`_sample`, at the latest by `provisional`).
            raw, engine.kv = engine.step.forward(engine.kv, self._feed, batch, self._variant)
            tokens, reported = None, {}
        else:
            tokens, self._feed, engine.kv, reported = engine.step(
                engine.kv, self._feed, batch, rows, self._variant, self._row_arrays(batch))
            raw = None
        now = time.perf_counter()
        if self._stats.startup_s is None:
            self._stats.startup_s = process_age_s()
        step = _InFlight(batch, tokens, reported, now,
                         engine.step.num_compiled_shapes > compiled,
                         step_flops(engine.config, batch),
                         all(c.is_decode for c in plan.chunks), raw=raw, sampling_rows=rows)
        if tokens is not None:
            self._watch.put(step)
        self._steps.append(step)
        return step

    def _sample(self, step: _InFlight) -> None:
        """Draws a split step's tokens from its logits: its grammar masks are filled now, from
        matchers that have taken every token before this step's."""
        if step.tokens is not None:
            return
        step.tokens, self._feed, step.reported = self._engine.step.sample(
            step.raw, self._feed, step.batch, step.sampling_rows, self._variant,
            self._row_arrays(step.batch))
        step.raw = None
        self._watch.put(step)

    def _row_arrays(self, batch) -> dict[str, np.ndarray]:
        """The variant's per-row inputs: scoring rows' targets (the next prompt token), which
        sampled rows report processed logprobs, and each constrained row's grammar mask."""
        v, live = self._variant, self._live
        rows = v.row_arrays(batch.logits_index.shape[0], self._engine.config.vocab_size)
        n = len(batch.sample_seq_ids)
        if v.logprobs:
            for j, (seq, pos) in enumerate(zip(batch.score_seq_ids, batch.score_positions)):
                rows["targets"][n + j] = live[seq].prompt_ids[pos + 1]
        if v.processed:
            for k, seq in enumerate(batch.sample_seq_ids):
                rows["processed"][k] = live[seq].request.sampling.logprobs_mode == "processed"
        if v.constrained:
            # A row past its request's end (a step planned before the end was known) keeps
            # the neutral mask: its token is dropped. The rest are filled on llguidance's
            # threads at once.
            constrained = [(live[seq].matcher, k) for k, seq in enumerate(batch.sample_seq_ids)
                           if live[seq].matcher is not None and live[seq].finish is None]
            if constrained:
                constrained[0][0].compiler.fill_bitmasks(constrained, rows["bitmask"])
        return rows

    def _logprob(self, reported: dict[str, np.ndarray], row: int, token: int,
                 k: int) -> TokenLogprob:
        return TokenLogprob(
            token, float(reported["target"][row]),
            tuple(zip(reported["top_ids"][row, :k].tolist(), reported["top"][row, :k].tolist())),
            int(reported["argmax"][row]))

    def provisional(self, plan, step: _InFlight) -> list[SampledToken]:
        self._sample(step)
        sampled = []
        for k, seq in enumerate(step.batch.sample_seq_ids):
            st = self._live[seq]
            if st.finish is not None:  # finished by a token collected after this step was planned
                continue
            st.scheduled += 1
            sampled.append(SampledToken(seq, placeholder_token(k),
                                        st.scheduled >= st.stop.token_limit))
        return sampled

    def collect(self, plan, step: _InFlight) -> list[SampledToken]:
        self._results.check()
        self._sample(step)
        t_wait = time.perf_counter()
        fetch = self._engine.step.fetch
        tokens = fetch(step.tokens)
        reported = {name: fetch(x) for name, x in step.reported.items()}
        now = time.perf_counter()
        self._waited += now - t_wait
        stats = self._stats
        sampled = []
        batch = step.batch
        n = len(batch.sample_seq_ids)
        # Prompt logprobs first: a request's last scoring rows come with its first sample.
        for j, (seq, pos) in enumerate(zip(batch.score_seq_ids, batch.score_positions)):
            st = self._live[seq]
            k = st.request.sampling.prompt_logprobs
            st.add_prompt_logprob(pos + 1, self._logprob(reported, n + j,
                                                         st.prompt_ids[pos + 1], k))
        for row, (seq, tok) in enumerate(zip(batch.sample_seq_ids, tokens[:n])):
            st = self._live[seq]
            if st.finish is not None:  # ran one step past its end: the token is dropped
                continue
            lp = None
            if st.logprobs is not None:
                lp = self._logprob(reported, row, int(tok), st.request.sampling.logprobs)
            finished = st.add(int(tok), lp)
            sampled.append(SampledToken(seq, int(tok), finished))
            if finished:
                stats.output_tokens += st.completion_tokens
                stats.prompt_tokens += len(st.prompt_ids)
                self._bar.update(1)
                self._results.put(st)
        stats.model_tokens += batch.num_tokens
        stats.model_flops += step.flops
        stats.padded_tokens += batch.token_ids.shape[0]
        stats.add_step(step.decode_only, step.compiled, step.flops, now - self._last_collect)
        self._last_collect = now
        elapsed = now - self._t_start
        if self._own_bar:
            self._bar.set_postfix(out_tok_s=f"{stats.output_tokens / max(elapsed, 1e-9):.1f}",
                                  step=plan.step_index, refresh=False)
        return sampled

    def close(self, check: bool = True) -> None:
        """Ends the run's threads once every result is handed on; with `check`, raises what
        failed on the results thread."""
        self._results.close(check=False)
        self._watch.put(None)
        self._watcher.join()
        if self._own_bar:
            self._bar.close()
        stats = self._stats
        stats.loop_s = time.perf_counter() - self._t_start
        stats.host_s = stats.loop_s - self._waited
        # The device's timeline: from one step's end to the next one's, it idled until the
        # next one was launched (if it was launched after the end).
        for before, step in zip(self._steps, self._steps[1:]):
            idle = max(0.0, step.launched - before.ended)
            stats.device_idle_s += idle
            if step.decode_only and before.decode_only and not step.compiled:
                stats.decode_idle_s += idle
                stats.decode_span_s += max(step.ended - before.ended, idle)
        if check:
            self._results.check()


def generate(requests: Iterable[str | dict | Request], model: str = "smollm2-135m", *,
             policy: str = "batchllm", sampling: SamplingParams | None = None,
             **options) -> list[Result]:
    """One-shot: load `model`, run every request under `policy`, return results in input order."""
    return Engine(model, policy=policy, **options).generate(requests, sampling=sampling)
