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

from batchjax.engine.page_pool import allocate_kv, pages_for_budget
from batchjax.engine.results import Result, error_result
from batchjax.engine.sampling import sampling_row_arrays
from batchjax.engine.step import ModelStep
from batchjax.engine.step_batch import build_step_batch
from batchjax.engine.stopping import StopChecker
from batchjax.models.flops import forward_flops
from batchjax.models.tokenizer import IncrementalDetokenizer
from batchjax.requests import (InvalidRequestError, Request, RequestError, SamplingParams,
                               requests_from_python)
from batchjax.metrics import process_age_s
from batchjax.schedule.buckets import BucketTable
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
    """Host state of one running request."""

    def __init__(self, request: Request, prompt_ids: tuple[int, ...], tokenizer,
                 eos_token_ids: tuple[int, ...], max_model_len: int):
        self.request = request
        self.prompt_ids = prompt_ids
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = StopChecker(request.sampling, eos_token_ids, max_model_len, len(prompt_ids))
        self.cached_prompt_tokens: int | None = None
        self.finish = None
        self.scheduled = 0  # tokens sampled for it so far, collected or still in flight

    def add(self, token_id: int) -> bool:
        self.generated.append(token_id)
        new_text = self.detok.add(token_id) if self.detok is not None else ""
        self.finish = self.stop.update(token_id, new_text)
        return self.finish is not None

    def result(self) -> Result:
        f = self.finish
        return Result(
            id=self.request.id,
            index=self.request.index,
            text=f.text if self.detok is not None else None,
            token_ids=tuple(self.generated[: f.num_tokens]),
            finish_reason=f.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=f.num_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens or 0,
            error=None,
        )


def _error_result(request: Request, field: str | None, message: str) -> Result:
    return error_result(RequestError(line=request.index + 1, id=request.id, field=field,
                                     message=message))


def step_flops(config, plan, sampled_rows: int) -> float:
    """Useful matmul FLOPs of a step: its real tokens, each over the keys it attends."""
    context = np.concatenate([
        c.prefix_len + c.own_start + 1 + np.arange(c.num_tokens) for c in plan.chunks])
    return forward_flops(config, context, sampled_rows)


class RequestPreparer:
    """Validates and tokenizes requests for a model: what a driver needs of an engine without
    its weights (`Engine` is one; the Ray driver holds one of its own)."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.max_model_len = config.max_position_embeddings

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

    def prepare_one(self, request: Request) -> _Live | Result:
        try:
            ids = self._prompt_ids(request)
        except InvalidRequestError as e:
            return _error_result(request, e.field, e.reason)
        if len(ids) >= self.max_model_len:
            field = "messages" if request.messages is not None else (
                "prompt" if request.prompt is not None else "prompt_token_ids")
            return _error_result(
                request, field,
                f"prompt has {len(ids)} tokens; the model context is {self.max_model_len}")
        eos = () if request.sampling.ignore_eos else self.config.eos_token_ids
        return _Live(request, ids, self.tokenizer, eos, self.max_model_len)

    def prepare(self, requests, *, sampling: SamplingParams | None = None,
                on_result: Callable[[Result], None] | None = None,
                skip_ids: frozenset[str] = frozenset()) -> tuple[list["_Live"], dict]:
        """Validates and tokenizes: (the requests to run, in input order; results so far by
        input index: the bad requests' errors, also passed to `on_result`)."""
        reqs = requests_from_python(list(requests), default_sampling=sampling)
        done: dict[int, Result] = {}
        live: list[_Live] = []
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
        return live, done

    @staticmethod
    def sched_requests(live: Sequence["_Live"]) -> list[SchedRequest]:
        """What the schedule sees of each request: its prompt and its token limit."""
        return [SchedRequest(st.prompt_ids, st.stop.token_limit) for st in live]


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
        dtype = dtype_of(self.options.dtype)
        self.policy = policy
        _enable_compilation_cache(self.options.compilation_cache_dir)
        if loaded is None:
            loaded = load_model(model, dtype=dtype)
        self.model_source = model
        RequestPreparer.__init__(self, loaded.config, loaded.tokenizer)
        o = self.options
        # The step keeps its own stacked copy of the parameters (laid out on `mesh`); the
        # module itself is dropped.
        self.step = ModelStep(loaded.model, o.attention, o.cpu_kernels, mesh=mesh)
        self.mesh = self.step.mesh
        kv_heads = self.step.layout.pool_kv_heads
        self.kv_budget_pages = pages_for_budget(self.config, o.page_size, dtype, o.kv_budget_mb,
                                                kv_heads)
        if self.kv_budget_pages < 1:
            raise ValueError(f"kv_budget_mb={o.kv_budget_mb} holds no page of KV for this model")
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
        live, done = self.prepare(requests, sampling=sampling, on_result=on_result,
                                  skip_ids=skip_ids)
        sched = self.sched_requests(live)
        batcher = make_batcher(policy, sched, self.budgets(),
                               **self.plan_options(policy, prefix_levels)) if live else None
        self.last_metrics = self.run(live, batcher, done, on_result=on_result, t0=t0,
                                     policy=policy)
        return [done[i] for i in sorted(done)]

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
        greedy = all(st.request.sampling.is_greedy for st in all_live)
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
                              greedy, o.progress and bar is None)
            warmup_s = time.perf_counter() - t_warm
            warm = self.step.num_compiled_shapes
            steps = _EngineSteps(self, buckets, feed, live, greedy, done, on_result, stats, bar)
            try:
                run_batcher(batcher, steps, overlap=o.overlap)
            finally:
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


@dataclasses.dataclass
class _InFlight:
    """A launched step: its layout, its device outputs, and when it started and ended."""

    batch: Any
    tokens: jax.Array  # [Ss] int32 on the device
    launched: float
    compiled: bool
    flops: float
    decode_only: bool
    ended: float = 0.0  # when the device had its tokens (set by the watcher)


class _EngineSteps:
    """The engine's `StepExecutor`: lays a plan out, runs the jitted step, and turns sampled
    tokens into per-request state, stop decisions and results."""

    def __init__(self, engine: "Engine", buckets: BucketTable, feed: jax.Array,
                 live: Sequence[_Live], greedy: bool, done: dict[int, Result], on_result,
                 stats: _RunStats, bar=None):
        self._engine, self._buckets, self._feed = engine, buckets, feed
        self._live, self._greedy, self._done, self._on_result = live, greedy, done, on_result
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
        batch = build_step_batch(plan, engine.options.page_size, self._buckets)
        rows = sampling_row_arrays(
            batch.logits_index.shape[0],
            [live[seq].request.sampling for seq in batch.sample_seq_ids], batch.sample_positions)
        compiled = engine.step.num_compiled_shapes
        tokens, self._feed, engine.kv = engine.step(engine.kv, self._feed, batch, rows,
                                                    self._greedy)
        now = time.perf_counter()
        if self._stats.startup_s is None:
            self._stats.startup_s = process_age_s()
        step = _InFlight(batch, tokens, now, engine.step.num_compiled_shapes > compiled,
                         step_flops(engine.config, plan, len(batch.sample_seq_ids)),
                         all(c.is_decode for c in plan.chunks))
        self._watch.put(step)
        self._steps.append(step)
        return step

    def provisional(self, plan, step: _InFlight) -> list[SampledToken]:
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
        t_wait = time.perf_counter()
        tokens = self._engine.step.fetch(step.tokens)
        now = time.perf_counter()
        self._waited += now - t_wait
        stats = self._stats
        sampled = []
        for seq, tok in zip(step.batch.sample_seq_ids, tokens[: len(step.batch.sample_seq_ids)]):
            st = self._live[seq]
            if st.finish is not None:  # ran one step past its end: the token is dropped
                continue
            finished = st.add(int(tok))
            sampled.append(SampledToken(seq, int(tok), finished))
            if finished:
                result = st.result()
                self._done[st.request.index] = result
                stats.output_tokens += result.completion_tokens
                stats.prompt_tokens += result.prompt_tokens
                if stats.time_to_first_result_s is None:
                    stats.time_to_first_result_s = process_age_s()
                self._bar.update(1)
                if self._on_result is not None:
                    self._on_result(result)
        batch = step.batch
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

    def close(self) -> None:
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


def generate(requests: Iterable[str | dict | Request], model: str = "smollm2-135m", *,
             policy: str = "batchllm", sampling: SamplingParams | None = None,
             **options) -> list[Result]:
    """One-shot: load `model`, run every request under `policy`, return results in input order."""
    return Engine(model, policy=policy, **options).generate(requests, sampling=sampling)
