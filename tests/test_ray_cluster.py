"""Data-parallel replicas as Ray actors: the same outputs as one replica, every id once, and a
replica lost mid-job costs nothing but time."""

import collections
import time

import numpy as np
import pytest

ray = pytest.importorskip(
    "ray", reason='the Ray replicas need the optional extra: pip install -e ".[ray]"')

from batchjax.cluster import Engine  # noqa: E402
from batchjax.cluster.ray_cluster import RayReplicas  # noqa: E402

OPTIONS = dict(page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32, progress=False)


def _requests(num_groups=8, per_group=4, seed=0):
    """Shared documents with a few questions each, and output limits spread out, so results
    arrive one by one over the job rather than all in one step."""
    rng = np.random.default_rng(seed)
    reqs = []
    for g in range(num_groups):
        doc = rng.integers(3, 128, size=int(rng.integers(20, 40))).tolist()
        for q in range(per_group):
            own = rng.integers(3, 128, size=int(rng.integers(1, 9))).tolist()
            reqs.append({"id": f"g{g}q{q}", "prompt_token_ids": doc + own,
                         "max_tokens": int(rng.integers(2, 25)), "ignore_eos": True})
    return reqs


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    reqs = _requests()
    local = Engine(str(tiny_llama_dir), data_parallel=1, **OPTIONS)
    results = local.generate(reqs)
    return reqs, {r.id: r.token_ids for r in results}, local.last_metrics


@pytest.fixture(scope="module")
def ray_engine(ray_cluster, tiny_llama_dir):
    engine = Engine(str(tiny_llama_dir), data_parallel=2, distributed="ray", **OPTIONS)
    # Both replicas compile before the first test: a cold one could otherwise still be
    # compiling when the other has run dry and taken all of its groups.
    engine.generate(_requests())
    yield engine
    engine._ray.close()


def _generate(engine, reqs, **kwargs):
    seen = []
    user = kwargs.pop("on_result", None)

    def on_result(result):
        seen.append(result.id)
        if user is not None:
            user(result)

    results = engine.generate(reqs, on_result=on_result, **kwargs)
    return results, seen


def _assert_complete(results, seen, reqs, want):
    ids = [r["id"] for r in reqs]
    assert sorted(seen) == sorted(ids)  # on_result: every id exactly once
    assert [r.id for r in results] == ids  # input order
    assert {r.id: r.token_ids for r in results} == {i: want[i] for i in ids}


def test_two_ray_replicas_match_one_local_replica(ray_engine, reference):
    reqs, want, local = reference
    results, seen = _generate(ray_engine, reqs)
    _assert_complete(results, seen, reqs, want)
    m = ray_engine.last_metrics
    assert m["distributed"] == "ray" and m["data_parallel"] == 2
    assert m["replica_failures"] == 0 and m["rerun_requests"] == 0
    assert abs(m["saving_ratio"] - local["saving_ratio"]) <= 0.01
    assert m["logical_prefill_tokens"] == local["logical_prefill_tokens"]
    assert m["num_groups"] == local["num_groups"]
    assert m["output_tokens"] == local["output_tokens"]
    assert sum(r["requests"] for r in m["replicas"]) == len(reqs)
    assert sum(r["reported_requests"] for r in m["replicas"]) == len(reqs)
    assert all(r["requests"] > 0 for r in m["replicas"])  # both did work
    assert len({r["pid"] for r in m["replicas"]}) == 2


def test_baseline_policy_splits_in_shares(ray_engine, reference):
    reqs, want, _ = reference
    results, seen = _generate(ray_engine, reqs, policy="vllm")
    _assert_complete(results, seen, reqs, want)  # greedy outputs do not depend on the policy
    assert ray_engine.last_metrics["policy"] == "vllm"


def test_resume_never_runs_skipped_ids(ray_engine, reference):
    reqs, want, _ = reference
    skip = frozenset(r["id"] for r in reqs[::3])
    results, seen = _generate(ray_engine, reqs, skip_ids=skip)
    rest = [r for r in reqs if r["id"] not in skip]
    _assert_complete(results, seen, rest, want)
    assert ray_engine.last_metrics["num_requests"] == len(rest)


@pytest.mark.parametrize("policy", ["batchllm", "vllm"])
def test_a_replica_dying_after_reports_loses_and_repeats_nothing(ray_engine, reference, policy):
    reqs, want, _ = reference
    replicas = ray_engine._ray
    _generate(ray_engine, reqs[:4])  # the replacement of the last one to die is warm
    ray.get(replicas.actors[1].crash_after_results.remote(3))  # exits after its third report
    results, seen = _generate(ray_engine, reqs, policy=policy)
    _assert_complete(results, seen, reqs, want)
    m = ray_engine.last_metrics
    assert m["replica_failures"] == 1 and m["replicas"][1]["failed"]
    assert collections.Counter(replicas.replica_of.values())[1] == 3
    # The survivor ran everything else, and none of the three that reported.
    assert m["replicas"][0]["requests"] == len(reqs) - 3
    assert m["rerun_requests"] >= 1


def test_a_replica_killed_mid_job_still_completes(ray_engine, reference):
    reqs, want, _ = reference
    replicas = ray_engine._ray
    killed = []

    def kill_the_other(result):
        if not killed:
            killed.append(1 - replicas.replica_of[result.id])
            ray.kill(replicas.actors[killed[0]])

    results, seen = _generate(ray_engine, reqs, on_result=kill_the_other)  # the dead one is
    _assert_complete(results, seen, reqs, want)  # replaced first: both start this job
    m = ray_engine.last_metrics
    assert m["replica_failures"] == 1 and m["replicas"][killed[0]]["failed"]
    # And the next job runs on a replacement, two replicas again.
    results, seen = _generate(ray_engine, reqs)
    _assert_complete(results, seen, reqs, want)
    assert ray_engine.last_metrics["replica_failures"] == 0
    assert all(not r["failed"] for r in ray_engine.last_metrics["replicas"])


def test_a_bad_address_fails_fast_and_names_it(tiny_llama_dir):
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        RayReplicas(str(tiny_llama_dir), ray_address="127.0.0.1:1", **OPTIONS)
    assert time.perf_counter() - t0 < 15
    with pytest.raises(ValueError, match="not host:port"):
        RayReplicas(str(tiny_llama_dir), ray_address="nowhere", **OPTIONS)


def test_more_replicas_than_the_cluster_holds_fail_before_work(ray_cluster, tiny_llama_dir):
    with pytest.raises(ValueError, match="data_parallel=3"):
        RayReplicas(str(tiny_llama_dir), data_parallel=3, **OPTIONS)


def test_a_group_over_one_replicas_budget_is_refused_before_any_work_is_handed_out():
    from batchjax.cluster.ray_cluster import _Coordinator
    from batchjax.schedule.step_plan import Budgets, SchedRequest

    doc = tuple(range(3, 43))  # 40 shared tokens: 10 pages of 4
    sched = [SchedRequest(doc + (50 + i,), 7) for i in range(3)]  # 1 + 7 own tokens: 2 pages
    coordinator = _Coordinator()
    started = coordinator.start(1, sched, "batchllm", 2, Budgets(32, 12, 4))
    assert "budget_error" not in started
    assert coordinator.take(1, 0, dry=True)[2] == (0, 1, 2)  # the one group, whole
    refused = coordinator.start(2, sched, "batchllm", 2, Budgets(32, 11, 4))
    assert "group" in refused["budget_error"] and "budget of 11 pages" in refused["budget_error"]
    assert coordinator.take(2, 0, dry=True) is None
