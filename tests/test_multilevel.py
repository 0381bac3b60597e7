"""Multi-level prefix sharing: the segment tree reaches the trie's saving, runs depth first,
frees every segment with its last request, and changes no output."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax import workloads
from batchjax.schedule import grouping
from batchjax.schedule.plan import build_plan, build_plan_from_tokens
from batchjax.schedule.prefix_tree import identify_prefixes
from batchjax.schedule.step_plan import Budgets, SchedRequest
from batchjax.sim.simulate import simulate
from batchjax.schedule.driver import run_batcher
from tests.test_batching import CheckingExecutor, replay, run_checked
from batchjax.schedule.policies import make_batcher


def generated_nested(depth: int, seed: int, vocab: int = 32000) -> workloads.Workload:
    """A nested workload `depth` + 1 levels deep (the last is each request's own part), with
    uneven fan-outs and segment lengths."""
    rng = np.random.default_rng(seed)
    lens = tuple((int(lo), int(lo) + int(rng.integers(0, 40)))
                 for lo in rng.integers(8, 120, size=depth + 1))
    fanouts = tuple(int(f) for f in rng.integers(2, 5, size=depth + 1))
    return workloads.nested(lens, (int(rng.integers(1, 3)),) + fanouts[1:], output_len=4,
                            vocab_size=vocab, seed=seed)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_the_plan_is_within_half_a_percent_of_the_trie(depth, seed):
    work = generated_nested(depth, seed)
    plan = build_plan_from_tokens(work.prompts, work.max_tokens)
    trie = identify_prefixes(work.prompts).num_trie_nodes
    logical = work.prompts.total_tokens
    assert plan.planned_prefill_tokens >= trie
    assert (plan.planned_prefill_tokens - trie) / logical <= 0.005
    assert plan.prefix_levels == depth
    # Single-level sharing computes the outer levels once per inner group: it saves less
    # wherever there is more than one level.
    single = build_plan_from_tokens(work.prompts, work.max_tokens, prefix_levels=1)
    if depth > 1:
        assert single.planned_prefill_tokens > plan.planned_prefill_tokens


def test_one_level_is_the_exact_single_level_grouping():
    work = generated_nested(3, seed=5)
    plan = build_plan_from_tokens(work.prompts, work.max_tokens, prefix_levels=1)
    exact = grouping.group(identify_prefixes(work.prompts), "exact")
    assert sorted((g.request_ids, g.prefix_len) for g in plan.groups) == sorted(
        (g.request_ids, g.prefix_len) for g in exact)
    assert plan.prefix_levels == 1
    assert all(len(g.chain) == (1 if g.prefix_len else 0) for g in plan.groups)


def test_chains_cover_each_prefix_and_runs_are_depth_first():
    work = generated_nested(3, seed=2)
    plan = build_plan_from_tokens(work.prompts, work.max_tokens)
    seg = plan.segments
    for g, ids in zip(plan.groups, plan.request_order):
        start = 0
        for k, end in g.chain:  # consecutive segments down one path of the tree
            assert seg.start[k] == start and seg.end[k] == end
            assert seg.chain(k) == tuple(s for s, _ in g.chain[: g.chain.index((k, end)) + 1])
            start = end
        assert start == g.prefix_len
        for i in ids:
            prompt = plan.prompts[i]
            assert len(prompt) > g.prefix_len  # every request keeps a token of its own
            assert np.array_equal(prompt[: g.prefix_len], g.prefix_tokens)
    # Depth first: the groups below any segment run one after another.
    for k in range(seg.num_nodes):
        below = [i for i, g in enumerate(plan.groups) if any(s == k for s, _ in g.chain)]
        assert below == list(range(below[0], below[-1] + 1)), k


def test_the_depth_cap_merges_the_least_valuable_segments():
    work = generated_nested(4, seed=1)
    full = build_plan_from_tokens(work.prompts, work.max_tokens)
    for cap in (1, 2, 3):
        plan = build_plan_from_tokens(work.prompts, work.max_tokens, prefix_levels=cap)
        assert plan.prefix_levels == cap
        assert all(len(g.chain) <= cap for g in plan.groups)
        assert plan.planned_prefill_tokens >= full.planned_prefill_tokens


def test_a_segment_that_saves_too_little_merges_into_its_parent():
    # 3 requests share 2 tokens after a 40-token head: (3 - 1) * 2 = 4 tokens saved.
    rng = np.random.default_rng(0)
    head = rng.integers(0, 1000, size=40).tolist()
    mid = rng.integers(0, 1000, size=2).tolist()
    prompts = [head + mid + rng.integers(0, 1000, size=5).tolist() for _ in range(3)]
    prompts += [head + rng.integers(0, 1000, size=5).tolist() for _ in range(2)]
    reqs = [SchedRequest(tuple(p), 4) for p in prompts]
    kept = build_plan(reqs, min_saved_tokens=4)
    merged = build_plan(reqs, min_saved_tokens=5)
    assert (kept.prefix_levels, kept.num_prefix_nodes) == (2, 2)
    assert (merged.prefix_levels, merged.num_prefix_nodes) == (1, 1)
    assert merged.planned_prefill_tokens - kept.planned_prefill_tokens == 4


@st.composite
def nested_requests(draw):
    """Small nested workloads over a tiny vocabulary: chance sharing at every depth."""
    depth = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    work = generated_nested(depth, seed, vocab=draw(st.sampled_from([3, 50, 32000])))
    keep = draw(st.integers(4, 24))
    reqs = [SchedRequest(tuple(p.tolist()), draw(st.integers(1, 6)),
                         draw(st.none() | st.integers(0, 6))) for p in list(work.prompts)[:keep]]
    outs = [draw(st.integers(1, r.max_tokens)) for r in reqs]
    return reqs, outs


@settings(max_examples=30, deadline=None)
@given(work=nested_requests(), slack=st.integers(0, 40), page_size=st.sampled_from([4, 16]),
       overlap=st.booleans(), levels=st.integers(1, 4))
def test_every_segment_is_freed_and_the_budget_holds(work, slack, page_size, overlap, levels):
    """The checking executor verifies every token's whole context, chain included; the pool
    is empty at the end, under budgets tight enough to preempt."""
    requests, output_lens = work
    worst = max(-(-(len(r.prompt_token_ids) + r.max_tokens) // page_size) for r in requests)
    budgets = Budgets(32, worst + levels + slack, page_size)
    batcher = make_batcher("batchllm", requests, budgets, prefix_levels=levels)
    result = run_checked(batcher, requests, output_lens, budgets, overlap)
    m = result.metrics
    assert all(count == 1 for count in result.finish_count.values())
    assert m["peak_kv_pages"] <= budgets.kv_budget_pages
    assert m["kv_pages_at_end"] == 0
    assert m["prefix_levels"] <= levels


def test_without_preemption_each_segment_is_computed_once_and_lives_with_its_subtree():
    work = workloads.nested((40, 30, 6), (2, 3, 4), output_len=3, seed=0)
    requests = work.to_sched_requests()
    plan = build_plan(requests)
    # Room for about one document's subtree at a time: the batch does not fit.
    budgets = Budgets(64, 40, 4)
    below = {}  # segment -> the requests below it
    for g in plan.groups:
        for seg, _ in g.chain:
            below.setdefault(seg, set()).update(g.request_ids)
    batcher = make_batcher("batchllm", requests, budgets, plan=plan)
    residency = []  # per step: (segments resident, segments expected to be)

    class Watching(CheckingExecutor):
        """Before each step runs: every segment computed (or under way) whose subtree has an
        unfinished request holds its pages, and no segment whose subtree has ended does
        (pages are reserved from its first group's admission)."""

        def launch(self, step):
            started = {s for st in self.steps + [step] for c in st.chunks
                       for s in c.prefix_chain + ((-c.seq_id - 1,) if c.seq_id < 0 else ())}
            live = {s for s in below if not below[s] <= set(self.ended_at)}
            resident = {s for s, seg in batcher._segments.items() if seg.resident}
            residency.append((resident, started & live, live))
            return super().launch(step)

    executor = Watching(requests, work.output_lens.tolist(), budgets, overlap=False)
    run_batcher(batcher, executor)
    m = batcher.metrics()
    assert m["num_preemptions"] == 0
    assert m["computed_prefill_tokens"] == plan.planned_prefill_tokens
    assert m["saving_ratio"] == pytest.approx(m["optimal_saving_ratio"], abs=1e-9)
    assert (m["prefix_levels"], m["num_prefix_nodes"]) == (2, 2 + 6)
    assert m["kv_pages_at_end"] == 0
    assert all(started <= resident <= live for resident, started, live in residency)
    assert max(len(r) for r, _, _ in residency) < len(below)  # never the whole tree at once
    # Segments sit at level 0 (the two system prompts) and level 1 (the documents).
    assert {p.level for step in executor.steps for p in step.prefixes} == {0, 1}


def test_the_simulator_replays_the_tree():
    work = workloads.nested((64, 48, 8), (2, 4, 4), output_len=4, seed=3)
    tree = simulate(work, "batchllm", page_size=16, kv_budget_pages=60).metrics
    single = simulate(work, "batchllm", page_size=16, kv_budget_pages=60,
                      prefix_levels=1).metrics
    assert tree["prefix_levels"] == 2 and single["prefix_levels"] == 1
    assert tree["computed_prefill_tokens"] < single["computed_prefill_tokens"]
    assert tree["saving_ratio"] == pytest.approx(tree["optimal_saving_ratio"], abs=1e-9)
    dp = simulate(work, "batchllm", page_size=16, kv_budget_pages=60, data_parallel=2).metrics
    # Whole subtrees per replica: no segment is computed twice.
    assert dp["computed_prefill_tokens"] == tree["computed_prefill_tokens"]


# -- the engine ---------------------------------------------------------------------------


def _nested_prompts(seed=0):
    """A system prompt over three documents over two to four questions each, and a prompt
    that shares nothing."""
    rng = np.random.default_rng(seed)
    system = rng.integers(3, 128, size=23).tolist()
    prompts = []
    for _ in range(3):
        doc = system + rng.integers(3, 128, size=17).tolist()
        for _ in range(int(rng.integers(2, 5))):
            prompts.append(tuple(doc + rng.integers(3, 128, size=rng.integers(1, 7)).tolist()))
    prompts.append(tuple(rng.integers(3, 128, size=15).tolist()))
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


def _requests(prompts, max_tokens):
    return [{"id": f"r{i}", "prompt_token_ids": list(p), "max_tokens": max_tokens,
             "ignore_eos": True} for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def nested_reference(tiny_llama_dir):
    from tests.conftest import hf_greedy

    prompts = _nested_prompts()
    return prompts, hf_greedy(tiny_llama_dir, prompts, 8)


@pytest.mark.parametrize("kv_budget_mb", [1.0, 0.05])
def test_the_engine_s_tree_gives_transformers_tokens_and_frees_every_page(
        tiny_llama_dir, nested_reference, kv_budget_mb):
    from batchjax.engine.engine import Engine

    prompts, want = nested_reference
    engine = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=kv_budget_mb,
                    max_tokens_per_step=32, progress=False)
    tree = engine.generate(_requests(prompts, 8))
    m = engine.last_metrics
    assert [r.token_ids for r in tree] == want
    assert (m["prefix_levels"], m["num_prefix_nodes"]) == (2, 4)
    assert m["kv_pages_at_end"] == 0 and m["peak_kv_pages"] <= m["kv_budget_pages"]
    assert m["compiled_after_warmup"] == 0
    if not m["num_preemptions"]:
        assert m["saving_ratio"] == pytest.approx(m["optimal_saving_ratio"], abs=1e-9)
    none = engine.generate(_requests(prompts, 8), policy="none")
    assert [r.token_ids for r in none] == want
    # Cached prompt tokens count the whole chain a request attended.
    assert {r.cached_prompt_tokens for r in tree} >= {40}


def test_one_level_computes_more_and_answers_the_same(tiny_llama_dir, nested_reference):
    from batchjax.engine.engine import Engine

    prompts, want = nested_reference
    single = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                    progress=False, prefix_levels=1)
    results = single.generate(_requests(prompts, 8))
    assert [r.token_ids for r in results] == want
    assert single.last_metrics["prefix_levels"] == 1
    sizes = _doc_sizes(prompts)
    tree_computed = sum(len(p) for p in prompts) - (sum(sizes) - 1) * 23 - sum(
        (n - 1) * 17 for n in sizes)
    # The system prompt once per document with one level, once in all with the tree.
    assert single.last_metrics["computed_prefill_tokens"] == tree_computed + 2 * 23


def _doc_sizes(prompts):
    heads = {}
    for p in prompts:
        if len(p) > 40:
            heads[p[:40]] = heads.get(p[:40], 0) + 1
    return list(heads.values())


def test_the_pallas_cascade_gives_the_xla_tokens(tiny_llama_dir, nested_reference):
    from batchjax.engine.engine import Engine

    prompts, want = nested_reference
    engine = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                    progress=False, attention="pallas")
    results = engine.generate(_requests(prompts[:6], 4))
    assert [r.token_ids for r in results] == [w[:4] for w in want[:6]]
    assert engine.last_metrics["prefix_levels"] == 2


def test_the_cascade_benchmark_compares_equal_work():
    """bench_cascade's two layouts of each step: the same tokens over the same contexts."""
    from batchjax.bench.cascade import PAGE, step_pairs
    from batchjax.engine.engine import step_flops
    from batchjax.engine.step_batch import build_step_batch
    from batchjax.models.config import ModelConfig
    from batchjax.schedule.buckets import BucketTable

    config = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=4096)
    for name, pair in step_pairs().items():
        tree, one = pair["tree"], pair["one level"]
        assert tree.num_tokens == one.num_tokens, name
        buckets = BucketTable.for_budget(1024, 128, prefix_levels=2)
        assert step_flops(config, build_step_batch(tree, PAGE, buckets)) == step_flops(
            config, build_step_batch(one, PAGE, buckets)), name
        assert max(len(c.prefix_chain) for c in tree.chunks) == (1 if "document" in name
                                                                 and "after" in name else 2)


def test_the_nested_suite_and_the_one_level_arm():
    from batchjax.bench import engine_arm, suite

    nested, micro = suite.nested(quick=True)
    plan = build_plan_from_tokens(nested.prompts, nested.max_tokens)
    assert len(nested) == 32 and plan.prefix_levels == 2
    assert plan.saving_ratio == pytest.approx(plan.optimal_saving_ratio)
    assert build_plan_from_tokens(micro.prompts, micro.max_tokens).prefix_levels == 1
    assert engine_arm.arm("batchllm-1level") == ("batchllm", {"prefix_levels": 1})
    with pytest.raises(ValueError, match="unknown batchjax arm"):
        engine_arm.arm("batchllm-7")
