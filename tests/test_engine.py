"""The engine computes what the model means, under every policy, within its budgets."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from batchjax.engine.engine import Engine
from batchjax.engine.page_pool import kv_bytes_per_page
from tests.conftest import hf_greedy

POLICIES = ("batchllm", "vllm", "sglang", "none")


def _shared_prefix_prompts(seed=0):
    """Two documents with three questions each, plus two unrelated prompts."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(2):
        doc = rng.integers(3, 128, size=37).tolist()
        for _ in range(3):
            prompts.append(tuple(doc + rng.integers(3, 128, size=rng.integers(1, 9)).tolist()))
    prompts.append(tuple(rng.integers(3, 128, size=21).tolist()))
    prompts.append((5,))
    return prompts


def _requests(prompts, max_tokens, **extra):
    return [{"id": f"r{i}", "prompt_token_ids": list(p), "max_tokens": max_tokens,
             "ignore_eos": True, **extra} for i, p in enumerate(prompts)]


def _engine_with_pages(model_dir, pages):
    probe = Engine(str(model_dir), page_size=4, kv_budget_mb=1.0, progress=False)
    page_mb = kv_bytes_per_page(probe.config, 4, np.float32) / 2**20
    return Engine(str(model_dir), page_size=4, kv_budget_mb=pages * page_mb,
                  max_tokens_per_step=32, progress=False)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                  progress=False)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    prompts = _shared_prefix_prompts()
    return prompts, hf_greedy(tiny_llama_dir, prompts, 12)


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_outputs_equal_transformers_under_every_policy(engine, reference, policy):
    prompts, want = reference
    results = engine.generate(_requests(prompts, 12), policy=policy)
    assert [r.id for r in results] == [f"r{i}" for i in range(len(prompts))]
    assert [r.token_ids for r in results] == want
    assert all(r.finish_reason == "length" for r in results)
    m = engine.last_metrics
    assert m["peak_kv_pages"] <= m["kv_budget_pages"]


def test_shared_prefix_is_computed_once(engine, reference):
    prompts, _ = reference
    engine.generate(_requests(prompts, 4), policy="batchllm")
    m = engine.last_metrics
    # Two 37-token documents each shared by three requests: two of every three copies are saved.
    assert m["logical_prefill_tokens"] == sum(len(p) for p in prompts)
    assert m["computed_prefill_tokens"] == m["logical_prefill_tokens"] - 2 * 2 * 37
    engine.generate(_requests(prompts, 4), policy="none")
    assert engine.last_metrics["computed_prefill_tokens"] == sum(len(p) for p in prompts)


def test_steps_are_timed_and_counted_by_phase(tiny_llama_dir, reference):
    prompts, _ = reference
    fresh = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                   progress=False)
    fresh.generate(_requests(prompts, 6), policy="batchllm")
    m = fresh.last_metrics
    # A fresh engine compiles its shapes in warm-up, before the first step: no step compiles.
    assert m["new_compiled_shapes"] > 0 and m["warmup_s"] > 0
    assert m["compiling_steps"] == m["compiled_after_warmup"] == 0
    assert m["prefill_steps"] + m["decode_steps"] == m["num_steps"]
    assert m["startup_s"] > 0 and m["time_to_first_result_s"] >= m["startup_s"]
    assert 0 <= m["device_idle_s"] < m["wall_s"] and m["host_s_per_step"] > 0
    fresh.generate(_requests(prompts, 6), policy="batchllm")
    m = fresh.last_metrics
    assert m["compiling_steps"] == 0
    assert m["prefill_steps"] > 0 and m["decode_steps"] > 0
    assert m["prefill_steps"] + m["decode_steps"] == m["num_steps"]
    assert m["prefill_flops"] + m["decode_flops"] == pytest.approx(m["model_flops"])
    assert 0 < m["prefill_s"] + m["decode_s"] <= m["wall_s"]
    assert m["decode_gflops_per_s"] == pytest.approx(m["decode_flops"] / m["decode_s"] / 1e9)
    # One output token is sampled by the last prompt chunk: no step is decode-only.
    for _ in range(2):  # the second run compiles nothing
        fresh.generate(_requests(prompts, 1), policy="batchllm")
    m = fresh.last_metrics
    assert m["decode_steps"] == 0 and m["decode_s"] == 0 and m["decode_gflops_per_s"] is None
    assert m["prefill_flops"] == pytest.approx(m["model_flops"]) and m["prefill_flops"] > 0


def test_nothing_compiles_after_warmup(engine, reference):
    prompts, _ = reference
    for policy in POLICIES:
        engine.generate(_requests(prompts, 6), policy=policy)
        assert engine.last_metrics["compiled_after_warmup"] == 0
        assert engine.last_metrics["compiling_steps"] == 0
    engine.generate(_requests(prompts, 6), policy="batchllm")
    assert engine.last_metrics["new_compiled_shapes"] == 0


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 40, "seed": 3}])
def test_overlapped_steps_give_the_synchronous_outputs(tiny_llama_dir, reference, sampling):
    """Steps planned one ahead of their tokens (requests ending on a stop token are known a
    step late, and their extra step is dropped) give exactly the synchronous loop's results,
    under a budget tight enough to preempt."""
    prompts, _ = reference
    synchronous = _engine_with_pages(tiny_llama_dir, 30)
    overlapped = _engine_with_pages(tiny_llama_dir, 30)
    synchronous.options = dataclasses.replace(synchronous.options, overlap=False)
    # Stop tokens that the tiny model samples often, so that many requests end early.
    first = hf_greedy(tiny_llama_dir, prompts, 12)
    stops = sorted({t for out in first for t in out[2:6]})[:6]
    reqs = [{"id": f"r{i}", "prompt_token_ids": list(p), "max_tokens": 12,
             "stop_token_ids": stops, **sampling} for i, p in enumerate(prompts)]
    for policy in ("batchllm", "vllm"):
        want = synchronous.generate(reqs, policy=policy)
        got = overlapped.generate(reqs, policy=policy)
        assert [(r.token_ids, r.finish_reason) for r in got] == [
            (r.token_ids, r.finish_reason) for r in want]
        assert any(r.finish_reason == "stop" for r in got)
        assert overlapped.last_metrics["overlap"] and not synchronous.last_metrics["overlap"]
        assert overlapped.last_metrics["peak_kv_pages"] <= 30


def test_tight_budget_preempts_and_changes_no_output(tiny_llama_dir, reference):
    prompts, want = reference
    # 30 pages of 4 tokens: far less than the batch needs at once.
    small = _engine_with_pages(tiny_llama_dir, 30)
    for policy in ("batchllm", "none"):
        results = small.generate(_requests(prompts, 12), policy=policy)
        assert [r.token_ids for r in results] == want
        m = small.last_metrics
        assert m["peak_kv_pages"] <= m["kv_budget_pages"] == 30


def test_impossible_budget_is_an_error_before_any_step(tiny_llama_dir):
    tiny = _engine_with_pages(tiny_llama_dir, 4)
    with pytest.raises(ValueError, match="budget"):
        tiny.generate(_requests([tuple(range(3, 40))], 12))
    assert tiny.step.num_compiled_shapes == 0


def test_bad_requests_get_errors_and_the_rest_complete(engine, reference):
    prompts, want = reference
    reqs = _requests(prompts[:2], 12)
    reqs.insert(1, {"id": "too-long", "prompt_token_ids": [3] * 300, "max_tokens": 4})
    reqs.append({"id": "bad-token", "prompt_token_ids": [3, 999], "max_tokens": 4})
    results = engine.generate(reqs)
    by_id = {r.id: r for r in results}
    assert by_id["too-long"].error.field == "prompt_token_ids"
    assert "context" in by_id["too-long"].error.message
    assert by_id["bad-token"].error.field == "prompt_token_ids"
    assert [by_id["r0"].token_ids, by_id["r1"].token_ids] == want[:2]


def test_max_tokens_past_the_context_ends_with_length(engine):
    results = engine.generate(_requests([tuple(3 + i % 100 for i in range(247))], 50))
    (r,) = results
    assert r.finish_reason == "length"
    assert r.completion_tokens == 256 - 247


def test_sampled_output_does_not_depend_on_the_batch(engine, reference):
    prompts, _ = reference
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 7}
    alone = engine.generate(_requests(prompts[1:2], 10, **sampling))
    together = engine.generate(_requests(prompts, 10, **sampling))
    assert together[1].token_ids == alone[0].token_ids
    assert len({r.token_ids for r in together[:3]}) > 1  # different prompts, different samples


def test_pallas_attention_gives_the_xla_outputs(tiny_llama_dir, reference):
    prompts, want = reference
    pallas = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                    attention="pallas", progress=False)
    # Interpret-mode kernels compile slowly on CPU: one group of three and two tokens each.
    results = pallas.generate(_requests(prompts[:3], 2), policy="batchllm")
    assert [r.token_ids for r in results] == [w[:2] for w in want[:3]]
    assert pallas.last_metrics["computed_prefill_tokens"] < pallas.last_metrics[
        "logical_prefill_tokens"]


@pytest.mark.gpu
def test_compiled_pallas_attention_on_a_gpu_gives_transformers_outputs(tiny_llama_dir, reference):
    """The kernels compiled for the GPU (not interpreted) inside the engine: every prompt, every
    token, shared prefix computed once."""
    prompts, want = reference
    pallas = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                    attention="pallas", progress=False)
    results = pallas.generate(_requests(prompts, 12), policy="batchllm")
    assert [r.token_ids for r in results] == want
    assert pallas.last_metrics["computed_prefill_tokens"] < pallas.last_metrics[
        "logical_prefill_tokens"]


@pytest.mark.parametrize("policy", ["batchllm", "vllm"])
def test_simulator_replays_the_engines_token_counts(engine, policy):
    from batchjax import workloads
    from batchjax.sim.simulate import simulate

    work = workloads.microbenchmark(prefix_len=20, distinct_len=5, output_len=6,
                                    sharing_degree=3, num_requests=9, vocab_size=128, seed=4)
    reqs = [{"id": str(i), "prompt_token_ids": [int(t) for t in p], "max_tokens": 6,
             "ignore_eos": True} for i, p in enumerate(work.prompts)]
    engine.generate(reqs, policy=policy)
    real = engine.last_metrics
    sim = simulate(work, policy, page_size=4, max_tokens_per_step=32,
                   max_num_seqs=engine.options.max_num_seqs,
                   kv_budget_pages=engine.kv_budget_pages).metrics
    for key in ("computed_prefill_tokens", "logical_prefill_tokens", "output_tokens",
                "num_steps", "peak_kv_pages"):
        assert sim[key] == real[key], key


def test_bf16_pools_store_bits_and_give_the_bf16_outputs(tiny_llama_dir, reference, monkeypatch):
    """A bf16 model's pools are uint16 bit patterns (XLA's CPU backend upcasts a bf16
    scatter's whole pool to f32 and back); reading them back must give exactly what bf16
    pools give."""
    from batchjax.engine import page_pool

    prompts, _ = reference
    kw = dict(dtype="bfloat16", page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
              progress=False)
    as_bits = Engine(str(tiny_llama_dir), **kw)
    assert as_bits.kv[0].dtype == np.uint16
    got = [r.token_ids for r in as_bits.generate(_requests(prompts, 8), policy="batchllm")]
    assert np.asarray(as_bits.kv[0]).any()  # the steps wrote keys into the pool

    monkeypatch.setattr(page_pool, "kv_storage_dtype", jnp.dtype)  # pools of plain bf16
    as_bf16 = Engine(str(tiny_llama_dir), **kw)
    assert as_bf16.kv[0].dtype == jnp.bfloat16
    want = [r.token_ids for r in as_bf16.generate(_requests(prompts, 8), policy="batchllm")]
    assert got == want


def test_native_and_xla_cpu_kernels_give_the_same_outputs(tiny_llama_dir, reference,
                                                          monkeypatch):
    # Dense products and paged rows go through the native CPU kernels by default where they
    # run; XLA's own code must give the same tokens, and both transformers' greedy tokens.
    from batchjax.attention import xla
    from batchjax.engine import step
    from batchjax.kernels import native

    traced = []  # which native kernels the steps were traced with

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            traced.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(step.packed_matmul, "packed_matmul",
                        counting("matmul", step.packed_matmul.packed_matmul))
    monkeypatch.setattr(xla.native_paged, "ragged_paged_attention",
                        counting("attention", xla.native_paged.ragged_paged_attention))
    prompts, want = reference
    runs = {}
    for kernels in ("xla", "auto"):
        traced.clear()
        engine = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0,
                        max_tokens_per_step=32, progress=False, cpu_kernels=kernels)
        runs[engine.step.cpu_kernels] = [
            r.token_ids for r in engine.generate(_requests(prompts, 12), policy="batchllm")]
        assert engine.last_metrics["cpu_kernels"] == engine.step.cpu_kernels
        # Both kernels run where native was chosen, neither where XLA was.
        want_traced = {"matmul", "attention"} if engine.step.cpu_kernels == "native" else set()
        assert set(traced) == want_traced
    assert "xla" in runs
    if native.cpu_has_avx2_fma():
        assert "native" in runs
    for tokens in runs.values():
        assert tokens == want


def test_bf16_native_cpu_kernels_give_xla_s_bf16_tokens(tiny_llama_dir, reference,
                                                       monkeypatch):
    # bf16 weights and pools through the native kernels (f32 arithmetic on bf16 values) and
    # through XLA's bf16 code: bf16 rounding may part the two where two logits nearly tie,
    # but no more than one request of the eight here may differ.
    from batchjax.attention import xla
    from batchjax.kernels import native

    if not native.cpu_has_avx2_fma():
        pytest.skip("the native kernels need x86-64 AVX2 and FMA")
    pool_dtypes = []  # the pools the native attention was traced with
    kernel = xla.native_paged.ragged_paged_attention

    def recording(q, k_pages, *args, **kwargs):
        pool_dtypes.append(k_pages.dtype)
        return kernel(q, k_pages, *args, **kwargs)

    monkeypatch.setattr(xla.native_paged, "ragged_paged_attention", recording)
    prompts, _ = reference
    runs = {}
    for kernels in ("xla", "native"):
        engine = Engine(str(tiny_llama_dir), dtype="bfloat16", page_size=4, kv_budget_mb=1.0,
                        max_tokens_per_step=32, progress=False, cpu_kernels=kernels)
        assert engine.step.cpu_kernels == kernels
        runs[kernels] = [r.token_ids
                         for r in engine.generate(_requests(prompts, 12), policy="batchllm")]
    # Only the native run reached the kernel, with the pools' bf16 bits.
    assert pool_dtypes and set(pool_dtypes) == {jnp.dtype(jnp.uint16)}
    same = sum(a == b for a, b in zip(runs["xla"], runs["native"]))
    assert same >= len(prompts) - 1, (runs["xla"], runs["native"])
