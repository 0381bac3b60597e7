"""The simulator: same token counts as the batchers it replays, times from the cost model."""

from __future__ import annotations

import pytest

from batchjax import workloads
from batchjax.schedule.policies import POLICIES, make_batcher
from batchjax.schedule.step_plan import Budgets, ChunkWork, PrefixRef, SampledToken, StepPlan
from batchjax.sim.cost_model import CostModel
from batchjax.sim.hardware import get_device, get_model
from batchjax.sim.plotting import plot_trace
from batchjax.sim.simulate import simulate

METRIC_NAMES = (
    "policy num_requests num_groups logical_prefill_tokens computed_prefill_tokens saving_ratio "
    "optimal_saving_ratio output_tokens num_steps peak_kv_pages kv_budget_pages plan_s "
    "simulated_s output_tokens_per_s"
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


@pytest.mark.parametrize("policy", POLICIES)
def test_simulator_counts_equal_the_batchers_own(micro, policy):
    budgets = Budgets(8192, 120, 16, 256)
    batcher = make_batcher(policy, micro.to_sched_requests(), budgets)
    produced = [0] * len(micro)
    while batcher.has_work():
        step = batcher.next_step()
        sampled = []
        for c in step.chunks:
            if c.sample:
                produced[c.seq_id] += 1
                done = produced[c.seq_id] == micro.output_lens[c.seq_id]
                sampled.append(SampledToken(c.seq_id, 1, bool(done)))
        batcher.complete(step, sampled)
    direct = batcher.metrics()
    simulated = simulate(micro, policy, kv_budget_pages=120).metrics
    for name in ("computed_prefill_tokens", "output_tokens", "num_steps", "peak_kv_pages"):
        assert simulated[name] == direct[name], name


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
