"""The simulator: same token counts as the batchers it replays, times from the cost model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from batchjax import workloads
from batchjax.schedule.driver import run_batcher
from batchjax.schedule.policies import POLICIES, make_batcher
from batchjax.schedule.prefix_tree import TokenBatch
from batchjax.schedule.step_plan import Budgets, ChunkWork, PrefixRef, StepPlan
from batchjax.sim.cost_model import CostModel, DoesNotFit
from batchjax.sim.hardware import GIB, ModelShape, get_device, get_model, profile_for
from batchjax.sim.plotting import plot_trace
from batchjax.sim.simulate import ReplaySteps, simulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRIC_NAMES = (
    "policy num_requests num_groups logical_prefill_tokens computed_prefill_tokens saving_ratio "
    "optimal_saving_ratio output_tokens num_steps peak_kv_pages kv_budget_pages plan_s "
    "simulated_s output_tokens_per_s model_flops"
).split()


@pytest.fixture(scope="module")
def micro() -> workloads.Workload:
    return workloads.microbenchmark(64, 8, 5, 4, 48, seed=3)


@pytest.mark.parametrize("policy", POLICIES)
def test_metrics_are_present_and_consistent(micro, policy):
    result = simulate(micro, policy, kv_budget_pages=120)
    m = result.metrics
    assert set(METRIC_NAMES) <= set(m)
    assert m["num_requests"] == len(micro)
    assert m["logical_prefill_tokens"] == micro.logical_prefill_tokens
    assert m["saving_ratio"] == pytest.approx(
        1 - m["computed_prefill_tokens"] / m["logical_prefill_tokens"]
    )
    assert m["output_tokens"] == int(micro.output_lens.sum())
    assert m["num_steps"] == len(result.trace.seconds)
    assert m["simulated_s"] == pytest.approx(result.trace.seconds.sum())
    assert m["output_tokens_per_s"] == pytest.approx(m["output_tokens"] / m["simulated_s"])
    assert m["peak_kv_pages"] == result.trace.kv_pages_in_use.max() <= m["kv_budget_pages"]
    decode_tokens = m["output_tokens"] - m["num_requests"]  # the first token comes from prefill
    assert result.trace.tokens.sum() == m["computed_prefill_tokens"] + decode_tokens


@pytest.fixture(scope="module")
def engine_runs(tiny_llama_dir):
    """The real engine (a tiny model, 120 pages of 16 tokens) on a microbenchmark of its
    vocabulary, under every policy: the schedule the simulator must replay."""
    from batchjax.engine.engine import Engine

    work = workloads.microbenchmark(64, 8, 5, 4, 48, vocab_size=128, seed=3)
    # 2 layers x K and V x 2 KV heads x 16 dims x 4 bytes x 16 tokens = 8 KiB a page.
    engine = Engine(str(tiny_llama_dir), page_size=16, kv_budget_mb=120 * 8192 / 2**20,
                    max_tokens_per_step=256, max_num_seqs=256, progress=False)
    assert engine.kv_budget_pages == 120
    requests = [{"id": str(i), "prompt_token_ids": list(r.prompt_token_ids),
                 "max_tokens": int(n), "ignore_eos": True}
                for i, (r, n) in enumerate(zip(work.to_sched_requests(), work.output_lens))]
    runs = {}
    for policy in POLICIES:
        engine.generate(requests, policy=policy)
        runs[policy] = dict(engine.last_metrics)
    return work, runs, engine.config


@pytest.mark.parametrize("policy", POLICIES)
def test_simulator_counts_equal_the_real_engines(engine_runs, policy):
    """The simulator replays the engine's schedule: the same prefill work, steps and pages as
    the engine measured running the model."""
    work, runs, config = engine_runs
    shape = ModelShape("tiny", config.num_layers, config.hidden_size, config.num_heads,
                       config.num_kv_heads, config.head_dim, config.intermediate_size,
                       config.vocab_size, config.tie_word_embeddings)
    simulated = simulate(work, policy, kv_budget_pages=120, max_tokens_per_step=256,
                         max_num_seqs=256, cost=CostModel(get_device("a100-80gb"), shape)).metrics
    for name in ("computed_prefill_tokens", "output_tokens", "num_steps", "peak_kv_pages"):
        assert simulated[name] == runs[policy][name], name
    # The FLOPs the engine counted running the model, by the simulator's own formula.
    assert simulated["model_flops"] == pytest.approx(runs[policy]["model_flops"], rel=1e-9)


def _uneven_work() -> workloads.Workload:
    """The microbenchmark's 12 shuffled groups with prompts and outputs of uneven lengths, so
    a split by prefix groups and a split into contiguous shares of the input put different
    requests, and different amounts of work, on each replica."""
    micro = workloads.microbenchmark(64, 8, 5, 4, 48, vocab_size=128, seed=3)
    prompts = [p[:65 + (i * 5) % 8] for i, p in enumerate(micro.prompts)]
    output_lens = 1 + (np.arange(len(prompts), dtype=np.int64) * 7) % 9
    return workloads.Workload("uneven", TokenBatch.from_sequences(prompts), output_lens,
                              output_lens.copy())  # the engine runs each to its max_tokens


BASELINES_SPLIT_IN_SHARES = ("none", "vllm")


@pytest.fixture(scope="module")
def engine_runs_on_two_replicas(tiny_llama_dir, tmp_path_factory):
    """The real engine with data_parallel=2 (two forced host devices, so in a subprocess)
    under the baselines: each replica's share and counts, which the simulator must replay."""
    work = _uneven_work()
    path = tmp_path_factory.mktemp("dp_baselines")
    requests_path, out = path / "requests.json", path / "out.json"
    requests_path.write_text(json.dumps(
        [{"id": str(i), "prompt_token_ids": p.tolist(), "max_tokens": int(n)}
         for i, (p, n) in enumerate(zip(work.prompts, work.max_tokens))]))
    engine = dict(data_parallel=2, page_size=16, kv_budget_mb=120 * 8192 / 2**20,
                  max_tokens_per_step=256, max_num_seqs=256)
    configs = [dict(engine, policy=policy) for policy in BASELINES_SPLIT_IN_SHARES]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    subprocess.run([sys.executable, "-m", "tests.multidevice_worker", str(tiny_llama_dir), "2",
                    json.dumps(configs), str(out), str(requests_path)],
                   check=True, cwd=REPO, env=env, timeout=600)
    runs = json.loads(out.read_text())
    return work, {policy: runs[str(k)] for k, policy in enumerate(BASELINES_SPLIT_IN_SHARES)}


@pytest.mark.parametrize("policy", BASELINES_SPLIT_IN_SHARES)
def test_simulated_replicas_replay_the_engines_replicas(engine_runs_on_two_replicas, policy):
    """Under data parallel the simulator splits a baseline's requests as the engine does, so
    every replica's requests, prefill work, steps and pages equal the engine's replica's."""
    work, runs = engine_runs_on_two_replicas
    engine = runs[policy]["replicas"]
    simulated = simulate(work, policy, data_parallel=2, kv_budget_pages=120,
                         max_tokens_per_step=256, max_num_seqs=256).metrics["replicas"]
    assert [r["kv_budget_pages"] for r in engine] == [120, 120]
    assert all(r["requests"] > 0 for r in engine)  # both replicas got work
    for k in range(2):
        for name in ("requests", "computed_prefill_tokens", "output_tokens", "steps",
                     "peak_kv_pages"):
            assert simulated[k][name] == engine[k][name], (k, name)


def test_batchllm_saves_more_than_vllm_when_memory_cannot_hold_every_prefix(micro):
    # 12 groups of 64-token prefixes (4 pages each) cannot all stay cached in 30 pages.
    batchllm = simulate(micro, "batchllm", kv_budget_pages=30).metrics
    vllm = simulate(micro, "vllm", kv_budget_pages=30).metrics
    assert batchllm["saving_ratio"] == pytest.approx(batchllm["optimal_saving_ratio"])
    assert batchllm["saving_ratio"] > vllm["saving_ratio"] + 0.2
    assert batchllm["output_tokens_per_s"] > vllm["output_tokens_per_s"]


def test_shared_prefix_attention_is_cheaper_than_rereading_the_prefix_per_request():
    cost = CostModel(get_device("a100-80gb"), get_model("llama-3.1-8b"))
    prefix = PrefixRef(0, tuple(range(1, 126)), 2000)
    shared = StepPlan(0, tuple(
        ChunkWork(i, (5,), 200, tuple(range(200, 214)), 0, 2000, True, True) for i in range(64)
    ), (prefix,))
    per_request = StepPlan(0, tuple(
        ChunkWork(i, (5,), 2200, tuple(range(1, 140)), None, 0, True, True) for i in range(64)
    ), ())
    # Both are memory bound: the saving is 63 fewer reads of the 2000-token prefix's KV.
    bandwidth = cost.device.hbm_bytes_per_s * cost.memory_efficiency
    saved = 63 * 2000 * cost.model.kv_bytes_per_token / bandwidth
    assert cost.step_seconds(per_request) - cost.step_seconds(shared) == pytest.approx(saved)


def test_kv_budget_comes_from_memory_left_after_the_weights():
    llama = CostModel(get_device("a100-80gb"), get_model("llama-3.1-8b"))
    assert 25_000 < llama.kv_budget_pages(16) < 32_000  # about 57 GiB of 128 KiB tokens
    with pytest.raises(ValueError, match="no KV memory"):
        CostModel(get_device("tpu-v5e"), get_model("qwen-2.5-14b")).kv_budget_pages(16)


def test_plot_file_is_written(micro, tmp_path):
    results = [simulate(micro, p, kv_budget_pages=120) for p in ("batchllm", "vllm")]
    path = tmp_path / "trace.png"
    plot_trace(results, path)
    assert path.stat().st_size > 1000


# -- scale-out: tensor and data parallelism ------------------------------------------------


def _one_chip_roofline(cost: CostModel, step: StepPlan) -> float:
    """The one-chip step estimate as it was before tensor parallelism, kept verbatim."""
    m = cost.model
    flops_per_s = cost.device.peak_flops * cost.compute_efficiency
    bytes_per_s = cost.device.hbm_bytes_per_s * cost.memory_efficiency
    tokens = sampled = pairs = kv_read = 0
    for c in step.chunks:
        n, start = len(c.token_ids), c.own_start
        tokens += n
        sampled += c.sample
        pairs += n * (start + c.prefix_len) + n * (n + 1) // 2
        kv_read += start + n
    kv_read += sum(p.prefix_len for p in step.prefixes)
    dense_flops = 2 * (m.num_layers * m.layer_params * tokens + m.lm_head_params * sampled)
    dense = max(dense_flops / flops_per_s, m.weight_bytes / bytes_per_s)
    attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * pairs
    attention_bytes = (kv_read + tokens) * m.kv_bytes_per_token
    attention = max(attention_flops / flops_per_s, attention_bytes / bytes_per_s)
    return dense + attention + cost.step_overhead_s


def _steps(work: workloads.Workload, policy: str, kv_budget_pages: int) -> list[StepPlan]:
    steps: list[StepPlan] = []
    batcher = make_batcher(policy, work.to_sched_requests(), Budgets(8192, kv_budget_pages, 16))
    run_batcher(batcher, ReplaySteps(work.output_lens.tolist(), steps.append))
    return steps


@pytest.mark.parametrize("device,model", [("a100-80gb", "llama-3.1-8b"), ("h200", "qwen-2.5-14b"),
                                          ("h200", "llama-3.1-70b")])
def test_one_chip_estimate_is_unchanged_bit_for_bit(micro, device, model):
    plain = CostModel(get_device(device), get_model(model))  # none of the new fields set
    explicit = CostModel(get_device(device), get_model(model), tensor_parallel=1)
    for policy in ("batchllm", "vllm"):
        for step in _steps(micro, policy, 30):
            want = _one_chip_roofline(plain, step)
            assert plain.step_seconds(step) == want
            assert explicit.step_seconds(step) == want
            assert plain.step_cost(step).communication_s == 0.0


def test_one_chip_results_equal_the_pre_parallel_numbers(micro):
    # Produced by the simulator before tensor and data parallelism existed. batchllm's plan
    # has since lost a step (a group's requests start in the step that finishes its prefix):
    # one step's fixed overhead less, every other cost the same.
    overhead = CostModel(get_device("a100-80gb"), get_model("llama-3.1-8b")).step_overhead_s
    one = simulate(micro, "batchllm", kv_budget_pages=120).metrics
    assert one["num_steps"] == 5
    assert one["simulated_s"] == pytest.approx(0.13822188404463723 - overhead, rel=1e-12)
    assert simulate(micro, "vllm", kv_budget_pages=120).metrics["simulated_s"] == (
        0.24379580807631293)
    h200 = simulate(micro, "batchllm", "h200", "llama-3.1-8b").metrics
    assert h200["kv_budget_pages"] == 51828
    assert h200["simulated_s"] == pytest.approx(0.056197908017526124 - overhead, rel=1e-12)
    assert (h200["tensor_parallel"], h200["data_parallel"], h200["num_devices"]) == (1, 1, 1)
    for device, model, pages in (("a100-80gb", "llama-3.1-8b", 28182),
                                 ("a100-80gb", "qwen-2.5-14b", 14503),
                                 ("h200", "qwen-2.5-7b", 119369)):
        assert CostModel(get_device(device), get_model(model)).kv_budget_pages(16) == pages


def _prefill_and_decode_steps() -> tuple[StepPlan, StepPlan]:
    prefill = StepPlan(0, tuple(
        ChunkWork(i, tuple(range(1024)), 0, (), None, 0, True) for i in range(8)), ())
    decode = StepPlan(1, tuple(
        ChunkWork(i, (5,), 1500, (), None, 0, True, True) for i in range(256)), ())
    return prefill, decode


def test_tensor_parallel_splits_the_work_and_pays_for_collectives():
    h200, llama = get_device("h200"), get_model("llama-3.1-70b")
    one, eight = CostModel(h200, llama), CostModel(h200, llama, tensor_parallel=8)
    for step in _prefill_and_decode_steps():
        c1, c8 = one.step_cost(step), eight.step_cost(step)
        assert c8.communication_s > 0
        assert c8.total_s < c1.dense_s + c1.attention_s  # faster than one chip's compute
        assert c8.dense_s == pytest.approx(c1.dense_s / 8)  # weights and FLOPs split 8 ways
        assert c8.attention_s == pytest.approx(c1.attention_s / 8)  # 1 of 8 KV heads per chip
    # Ring collectives: 2 all-reduces per layer of tokens x hidden bf16 values, and an
    # all-gather of the sampled rows' logits (the embedding table is whole on every chip).
    prefill = _prefill_and_decode_steps()[0]
    link = h200.link_bytes_per_s * eight.link_efficiency
    all_reduce = 2 * 7 / 8 * 8192 * 8192 * 2 / link + h200.collective_latency_s
    gather = 7 / 8 * 8 * 128256 * 2 / link + h200.collective_latency_s
    assert eight.step_cost(prefill).communication_s == pytest.approx(160 * all_reduce + gather)


def test_kv_budget_spreads_weights_and_kv_over_the_chips():
    h200, llama = get_device("h200"), get_model("llama-3.1-70b")
    pages = {t: CostModel(h200, llama, tensor_parallel=t).kv_budget_pages(16) for t in (2, 4, 8)}
    free = 141e9 * 0.9 - llama.weight_bytes / 8 - 2 * GIB  # per chip
    assert pages[8] == int(free // (16 * llama.kv_bytes_per_token / 8))
    assert pages[2] < pages[4] < pages[8]


def test_a_model_that_does_not_fit_says_so_with_sizes(micro):
    h200, llama = get_device("h200"), get_model("llama-3.1-70b")
    with pytest.raises(DoesNotFit, match=r"does not fit on one h200: its 131\.4 GiB of weights.*"
                                         r"131\.3 GiB.*smallest tensor_parallel that fits is 2"):
        CostModel(h200, llama).kv_budget_pages(16)
    with pytest.raises(DoesNotFit, match="does not fit"):
        simulate(micro, "batchllm", "h200", "llama-3.1-70b")
    with pytest.raises(DoesNotFit, match=r"8 x tpu-v5e.*16\.4 GiB per chip"):
        CostModel(get_device("tpu-v5e"), llama, tensor_parallel=8).kv_budget_pages(16)
    with pytest.raises(DoesNotFit, match="28 attention heads do not split over tensor_parallel=8"):
        CostModel(h200, get_model("qwen-2.5-7b"), tensor_parallel=8)
    with pytest.raises(DoesNotFit, match="link domain"):
        CostModel(h200, llama, tensor_parallel=16)


def test_data_parallel_halves_a_balanced_job(micro):
    # 12 equal groups; 30 KV pages per replica hold a few at a time, so each replica works
    # through its groups in waves and two replicas take half the time.
    kwargs = dict(device="h200", model="llama-3.1-70b", tensor_parallel=8, kv_budget_pages=30)
    one = simulate(micro, "batchllm", **kwargs)
    two = simulate(micro, "batchllm", data_parallel=2, **kwargs)
    m1, m2 = one.metrics, two.metrics
    assert m2["simulated_s"] / m1["simulated_s"] == pytest.approx(0.5, abs=0.05)
    assert m2["saving_ratio"] == pytest.approx(m1["saving_ratio"], abs=0.01)
    assert m2["saving_ratio"] == pytest.approx(m2["optimal_saving_ratio"])
    assert (m2["data_parallel"], m2["num_devices"]) == (2, 16)
    replicas = m2["replicas"]
    assert [r["requests"] for r in replicas] == [24, 24]
    assert [r["groups"] for r in replicas] == [6, 6]
    assert m2["simulated_s"] == max(r["simulated_s"] for r in replicas)
    assert m2["replica_balance"] == pytest.approx(1.0, abs=0.02)
    for key in ("num_requests", "output_tokens", "logical_prefill_tokens"):
        assert m2[key] == m1[key], key
    assert all(r["kv_budget_pages"] == 30 for r in replicas)  # each its own budget
    assert len(two.replicas) == 2 and two.trace.seconds.sum() == pytest.approx(m2["simulated_s"])


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_on_replicas(micro, policy):
    m = simulate(micro, policy, tensor_parallel=2, data_parallel=3, kv_budget_pages=120).metrics
    assert m["num_requests"] == len(micro) == sum(r["requests"] for r in m["replicas"])
    assert m["output_tokens"] == int(micro.output_lens.sum())
    assert m["replica_balance"] >= 1.0


def test_more_replicas_than_groups_leaves_some_idle():
    work = workloads.microbenchmark(32, 4, 3, 4, 8, seed=1)  # 2 groups
    m = simulate(work, "batchllm", data_parallel=3, kv_budget_pages=60).metrics
    assert sorted(r["requests"] for r in m["replicas"]) == [0, 4, 4]
    assert m["output_tokens"] == int(work.output_lens.sum())


def test_cli_prints_estimates_for_tensor_and_data_parallel(micro, tmp_path):
    path, metrics_path = tmp_path / "w.jsonl", tmp_path / "m.json"
    workloads.write_jsonl(micro, path)
    cmd = [sys.executable, "-m", "experiments.simulate", f"--input={path}", "--device=h200",
           "--model=llama-3.1-70b", "--tensor_parallel=4", "--data_parallel=2",
           f"--metrics_out={metrics_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "estimate" in proc.stdout
    assert "8 x h200" in proc.stdout and "tensor_parallel=4" in proc.stdout
    m = json.loads(metrics_path.read_text())
    assert (m["tensor_parallel"], m["data_parallel"], len(m["replicas"])) == (4, 2, 2)
    # Too few chips: a clear error, not a traceback.
    proc = subprocess.run(cmd[:6] + ["--tensor_parallel=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not fit on one h200" in proc.stderr and "Traceback" not in proc.stderr


def test_a_real_device_is_matched_to_its_profile_by_name():
    assert [profile_for(k) for k in ("NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                     "NVIDIA A100-SXM4-80GB", "cpu")] == [
        "h100", "h200", "a100-80gb", None]
