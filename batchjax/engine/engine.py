"""The engine: requests in, every completion out, through a policy's batcher and the model step.

Planning decides, the engine executes: each step the batcher emits a `StepPlan`, the engine lays
it out as a `StepBatch`, runs the jitted step, and reports the sampled tokens back. Host state per
request (generated tokens, detokenizer, stop logic) lives here; page ids live in the batcher.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from batchjax.engine.page_pool import allocate_kv, pages_for_budget
from batchjax.engine.results import Result, error_result
from batchjax.engine.step import ModelStep
from batchjax.engine.step_batch import build_step_batch
from batchjax.engine.stopping import StopChecker
from batchjax.models.flops import forward_flops
from batchjax.models.tokenizer import IncrementalDetokenizer
from batchjax.requests import (InvalidRequestError, Request, RequestError, SamplingParams,
                               requests_from_python)
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.step_plan import Budgets, SampledToken, SchedRequest

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
    progress: bool = True
    # XLA programs persist here across processes (a rerun skips compilation); "" turns it off.
    compilation_cache_dir: str = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "batchjax", "xla")


def _enable_compilation_cache(path: str) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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


class Engine:
    """A loaded model and its KV pools, reusable for many `generate` calls."""

    def __init__(self, model: str = "smollm2-135m", *, policy: str = "batchllm", **options):
        from batchjax.models.registry import load_model  # heavy: keep `import batchjax` light

        self.options = EngineOptions(**options)
        if self.options.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.options.dtype!r}")
        dtype = _DTYPES[self.options.dtype]
        self.policy = policy
        _enable_compilation_cache(self.options.compilation_cache_dir)
        loaded = load_model(model, dtype=dtype)
        self.model_source = model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = self.config.max_position_embeddings
        o = self.options
        self.kv_budget_pages = pages_for_budget(self.config, o.page_size, dtype, o.kv_budget_mb)
        if self.kv_budget_pages < 1:
            raise ValueError(f"kv_budget_mb={o.kv_budget_mb} holds no page of KV for this model")
        self.kv = allocate_kv(self.config, self.kv_budget_pages, o.page_size, dtype)
        self.buckets = BucketTable.for_budget(o.max_tokens_per_step)
        # The step keeps its own stacked copy of the parameters; the module itself is dropped.
        self.step = ModelStep(loaded.model, o.attention, o.cpu_kernels)
        self.last_metrics: dict[str, Any] = {}

    # -- preparing requests -------------------------------------------------------------------

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

    def _prepare(self, request: Request) -> _Live | Result:
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

    # -- running ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Iterable[str | dict | Request],
        *,
        policy: str | None = None,
        sampling: SamplingParams | None = None,
        on_result: Callable[[Result], None] | None = None,
        skip_ids: frozenset[str] = frozenset(),
    ) -> list[Result]:
        """Every request's result, in input order; bad requests get an error result."""
        policy = policy or self.policy
        reqs = requests_from_python(list(requests), default_sampling=sampling)
        t0 = time.perf_counter()
        done: dict[int, Result] = {}
        live: list[_Live] = []
        for r in reqs:
            if r.id in skip_ids:
                continue
            prepared = self._prepare(r)
            if isinstance(prepared, Result):
                done[r.index] = prepared
                if on_result is not None:
                    on_result(prepared)
            else:
                live.append(prepared)

        o = self.options
        budgets = Budgets(o.max_tokens_per_step, self.kv_budget_pages, o.page_size,
                          max_num_seqs=o.max_num_seqs)
        sched = [SchedRequest(st.prompt_ids,
                              min(st.request.sampling.max_tokens,
                                  self.max_model_len - len(st.prompt_ids)))
                 for st in live]
        greedy = all(st.request.sampling.is_greedy for st in live)
        compiled_before = self.step.num_compiled_shapes
        stats = _RunStats()
        if live:
            batcher = make_batcher(policy, sched, budgets)
            self._run(batcher, live, greedy, done, on_result, stats)
            metrics = dict(batcher.metrics())
        else:
            metrics = {"policy": policy, "num_requests": 0}
        wall = time.perf_counter() - t0
        metrics.update(
            wall_s=wall,
            output_tokens_per_s=stats.output_tokens / wall if wall > 0 else 0.0,
            total_tokens_per_s=(stats.output_tokens + stats.prompt_tokens) / wall
            if wall > 0 else 0.0,
            num_compiled_shapes=self.step.num_compiled_shapes,
            new_compiled_shapes=self.step.num_compiled_shapes - compiled_before,
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
            padded_tokens=stats.padded_tokens,
            attention=o.attention,
            cpu_kernels=self.step.cpu_kernels,
            dtype=o.dtype,
        )
        self.last_metrics = metrics
        return [done[i] for i in sorted(done)]

    def _run(self, batcher, live: Sequence[_Live], greedy: bool, done: dict[int, Result],
             on_result, stats: "_RunStats") -> None:
        page_size = self.options.page_size
        bar = tqdm(total=len(live), unit="req", disable=not self.options.progress,
                   desc="generate", dynamic_ncols=True)
        t_start = time.perf_counter()
        while batcher.has_work():
            t_step = time.perf_counter()
            plan = batcher.next_step()
            for c in plan.chunks:
                if c.seq_id >= 0 and live[c.seq_id].cached_prompt_tokens is None:
                    live[c.seq_id].cached_prompt_tokens = c.prefix_len + c.own_start
            batch = build_step_batch(plan, page_size, self.buckets,
                                     ragged=self.options.attention == "pallas")
            rows = self._sampling_rows(batch, live)
            compiled = self.step.num_compiled_shapes
            tokens, self.kv = self.step(self.kv, batch, rows, greedy)
            stats.model_tokens += batch.num_tokens
            flops = step_flops(self.config, plan, len(batch.sample_seq_ids))
            stats.model_flops += flops
            stats.padded_tokens += batch.token_ids.shape[0]
            sampled = []
            for seq, tok in zip(batch.sample_seq_ids, tokens[: len(batch.sample_seq_ids)]):
                st = live[seq]
                finished = st.add(int(tok))
                sampled.append(SampledToken(seq, int(tok), finished))
                if finished:
                    result = st.result()
                    done[st.request.index] = result
                    stats.output_tokens += result.completion_tokens
                    stats.prompt_tokens += result.prompt_tokens
                    bar.update(1)
                    if on_result is not None:
                        on_result(result)
            batcher.complete(plan, sampled)
            # The whole step, planning and sampling included, under the phase it belongs to;
            # a step that compiled a new shape is counted apart.
            stats.add_step(all(c.is_decode for c in plan.chunks),
                           self.step.num_compiled_shapes > compiled, flops,
                           time.perf_counter() - t_step)
            elapsed = time.perf_counter() - t_start
            bar.set_postfix(out_tok_s=f"{stats.output_tokens / max(elapsed, 1e-9):.1f}",
                            step=plan.step_index, refresh=False)
        bar.close()

    def _sampling_rows(self, batch, live: Sequence[_Live]) -> tuple[np.ndarray, ...]:
        """Per sampled row: temperature, top_k, top_p, min_p, seed, position ([Ss] each)."""
        n = batch.logits_index.shape[0]
        temperature = np.zeros(n, np.float32)
        top_k = np.zeros(n, np.int32)
        top_p = np.ones(n, np.float32)
        min_p = np.zeros(n, np.float32)
        seeds = np.zeros(n, np.uint32)
        for i, seq in enumerate(batch.sample_seq_ids):
            s = live[seq].request.sampling
            temperature[i], top_k[i], top_p[i], min_p[i], seeds[i] = (
                s.temperature, s.top_k, s.top_p, s.min_p, s.seed)
        return temperature, top_k, top_p, min_p, seeds, batch.sample_positions


def _rate(amount: float, seconds: float) -> float | None:
    return amount / seconds if seconds > 0 else None


@dataclasses.dataclass
class _RunStats:
    output_tokens: int = 0
    prompt_tokens: int = 0
    model_tokens: int = 0
    padded_tokens: int = 0
    model_flops: float = 0.0
    # Steps that compute prompt tokens (alone or mixed with decode rows), decode-only ones,
    # and the steps of either kind that compiled a new shape first.
    prefill_steps: int = 0
    prefill_s: float = 0.0
    prefill_flops: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_flops: float = 0.0
    compiling_steps: int = 0
    compiling_s: float = 0.0

    def add_step(self, decode_only: bool, compiled: bool, flops: float, seconds: float) -> None:
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


def generate(requests: Iterable[str | dict | Request], model: str = "smollm2-135m", *,
             policy: str = "batchllm", sampling: SamplingParams | None = None,
             **options) -> list[Result]:
    """One-shot: load `model`, run every request under `policy`, return results in input order."""
    return Engine(model, policy=policy, **options).generate(requests, sampling=sampling)
