"""`Engine` over many chips: `data_parallel` replicas of `tensor_parallel` devices each.

In one process (`distributed="local"`) the replicas are sub-meshes of this process's devices
and run side by side in threads (a step releases the GIL while it runs); with
`distributed="ray"` each replica is a Ray actor (`batchjax.cluster.ray_cluster`). Either way
the job is planned once, results reach `on_result` (the journal) as they finish, and the
metrics add up the replicas and show their balance. One replica is the same code path.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Sequence

from batchjax.cluster.queues import ReplicaQueues
from batchjax.engine import engine as engine_lib
from batchjax.engine.results import Result, SampleCollector
from batchjax.metrics import saving_ratio
from batchjax.requests import Request, SamplingParams
from batchjax.schedule.batching import BatchLLMBatcher, check_kv_budget
from batchjax.schedule.plan import build_plan
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.replicas import assign_subtrees, baseline_shares
from batchjax.sharding.mesh import make_mesh, replica_meshes

DISTRIBUTED = ("local", "ray")
# Counters that add up over replicas; the others are per replica (budgets, peaks) or per job.
SUMMED_METRICS = ("num_requests", "num_groups", "logical_prefill_tokens", "computed_prefill_tokens",
           "output_tokens", "num_steps", "num_preemptions", "num_preempted_groups", "model_tokens", "model_flops",
           "prefill_steps", "prefill_flops", "decode_steps", "decode_flops", "compiling_steps",
           "padded_tokens", "compiled_after_warmup", "kv_pages_at_end")


def group_cost(prefix_len: int, own_lens: Sequence[int], max_tokens: Sequence[int]) -> float:
    """A group's estimated work: the tokens it runs through the model (its prefix once, every
    suffix, every output token at its limit). Only the ranking of groups matters here, and the
    dense products, which every token pays alike, dominate a step on every device."""
    return float(prefix_len + sum(own_lens) + sum(max_tokens))


def plan_replicas(sched, num_replicas: int, **plan_options):
    """The job's plan, its groups as batcher work, and their per-replica queues (whole
    subtrees of shared segments per replica; `plan_options` go to `build_plan`)."""
    plan = build_plan(sched, **plan_options)
    groups, costs = plan.group_work(), []
    for g, ids, new in zip(plan.groups, plan.request_order, plan.new_prefix_lens().tolist()):
        prefix_len = len(g.prefix_token_ids)
        costs.append(group_cost(new, [len(sched[i].prompt_token_ids) - prefix_len for i in ids],
                                [sched[i].max_tokens for i in ids]))
    queues = ReplicaQueues(groups, costs,
                           assign_subtrees(costs, plan.subtree_of_group(), num_replicas))
    return plan, queues


class _SharedBar:
    """One progress bar for the whole job, updated by every replica."""

    def __init__(self, bar):
        self._bar, self._lock = bar, threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def merge_metrics(per_replica: Sequence[dict], *, wall_s: float, plan=None,
                  devices: Sequence[Sequence[Any]] = (), stolen: Sequence[int] = (),
                  planned: Sequence[int] = ()) -> dict:
    """One job's metrics from its replicas' (each as `batchjax.engine.Engine.run` reports)."""
    first = per_replica[0]
    m = dict(first)
    for key in SUMMED_METRICS:
        if any(key in r for r in per_replica):
            m[key] = sum(r.get(key) or 0 for r in per_replica)
    for key in ("peak_kv_pages", "num_compiled_shapes", "warmup_s"):
        if key in first:
            m[key] = max(r.get(key) or 0 for r in per_replica)
    for key in ("prefill_s", "decode_s", "compiling_s", "device_idle_s"):
        if key in first:
            m[key] = sum(r.get(key) or 0 for r in per_replica)
    if plan is not None:
        m["num_groups"] = plan.num_groups
        m["optimal_saving_ratio"] = plan.optimal_saving_ratio
        m["plan_s"] = plan.plan_s
        m["prefix_levels"] = plan.prefix_levels
        m["num_prefix_nodes"] = plan.num_prefix_nodes
    if "logical_prefill_tokens" in m:
        m["saving_ratio"] = saving_ratio(m["logical_prefill_tokens"],
                                         m["computed_prefill_tokens"])
    starts = [r["startup_s"] for r in per_replica if r.get("startup_s") is not None]
    firsts = [r["time_to_first_result_s"] for r in per_replica
              if r.get("time_to_first_result_s") is not None]
    m["startup_s"] = min(starts) if starts else None
    m["time_to_first_result_s"] = min(firsts) if firsts else None
    m["time_to_last_result_s"] = max((r.get("time_to_last_result_s") or 0) for r in per_replica)
    m["wall_s"] = wall_s
    prompt = sum(r.get("finished_prompt_tokens", 0) for r in per_replica)
    m["output_tokens_per_s"] = m.get("output_tokens", 0) / wall_s if wall_s > 0 else 0.0
    m["total_tokens_per_s"] = (m.get("output_tokens", 0) + prompt) / wall_s if wall_s > 0 else 0.0
    m["data_parallel"] = len(per_replica)
    m["num_devices"] = sum(r.get("num_devices", 0) for r in per_replica)
    busy = [r.get("busy_s") or 0.0 for r in per_replica]
    m["replicas"] = [
        {"replica": k, "devices": [str(d) for d in (devices[k] if k < len(devices) else ())],
         "requests": r.get("num_requests", 0), "groups": r.get("num_groups", 0),
         "planned_groups": planned[k] if k < len(planned) else None,
         "stolen_groups": stolen[k] if k < len(stolen) else 0,
         "output_tokens": r.get("output_tokens", 0), "computed_prefill_tokens":
         r.get("computed_prefill_tokens", 0), "busy_s": r.get("busy_s"),
         "steps": r.get("num_steps", 0), "peak_kv_pages": r.get("peak_kv_pages"),
         "kv_budget_pages": r.get("kv_budget_pages")}
        for k, r in enumerate(per_replica)]
    mean = sum(busy) / len(busy) if busy else 0.0
    m["replica_balance"] = max(busy) / mean if mean > 0 else None  # 1.0: perfectly even
    m.pop("busy_s", None)
    return m


class Engine:
    """A model on `tensor_parallel x data_parallel` devices, reusable for many `generate`s.

    Keywords are those of `batchjax.engine.Engine` (dtype, attention, budgets, ...), which
    apply to every replica: each has its own KV budget of `kv_budget_mb`.
    """

    def __init__(self, model: str = "smollm2-135m", *, policy: str = "batchllm",
                 tensor_parallel: int = 1, data_parallel: int = 1, distributed: str = "local",
                 ray_address: str | None = None, devices=None, **options):
        if distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {DISTRIBUTED}, got {distributed!r}")
        self.policy = policy
        self.tensor_parallel, self.data_parallel = tensor_parallel, data_parallel
        self.distributed = distributed
        self.last_metrics: dict[str, Any] = {}
        if distributed == "ray":
            from batchjax.cluster import ray_cluster  # the optional extra

            self._ray = ray_cluster.RayReplicas(
                model, policy=policy, tensor_parallel=tensor_parallel,
                data_parallel=data_parallel, ray_address=ray_address, **options)
            self.replicas = []
            self.config, self.tokenizer = self._ray.config, self._ray.tokenizer
            return
        if ray_address is not None:
            raise ValueError("ray_address needs distributed='ray'")
        self._ray = None
        import jax

        if jax.process_count() > 1 and data_parallel > 1:
            raise ValueError(
                f"data_parallel={data_parallel} over {jax.process_count()} processes is not "
                f"supported: every process takes part in every step of a multi-host job, so "
                f"use tensor_parallel over all its devices and data_parallel=1 (or Ray "
                f"actors, distributed='ray', for replicas on many hosts)")
        mesh = make_mesh(tensor_parallel, data_parallel, devices)  # before anything loads
        from batchjax.models.registry import load_model

        loaded = load_model(model, dtype=engine_lib.dtype_of(options.get("dtype", "float32")))
        self.replicas = [engine_lib.Engine(model, policy=policy, mesh=m, loaded=loaded, **options)
                         for m in replica_meshes(mesh)]
        self.config, self.tokenizer = self.replicas[0].config, self.replicas[0].tokenizer

    @property
    def options(self):
        return self._ray.options if self._ray is not None else self.replicas[0].options

    @property
    def kv_budget_pages(self) -> int | None:
        """KV pages of each replica's budget (None for Ray replicas until a job reports)."""
        if self._ray is not None:
            return self.last_metrics.get("kv_budget_pages")
        return self.replicas[0].kv_budget_pages

    def generate(
        self,
        requests: Iterable[str | dict | Request],
        *,
        policy: str | None = None,
        sampling: SamplingParams | None = None,
        on_result: Callable[[Result], None] | None = None,
        skip_ids: frozenset[str] = frozenset(),
    ) -> list[Result]:
        """Every request's result, in input order (as `batchjax.engine.Engine.generate`)."""
        policy = policy or self.policy
        samples = SampleCollector()  # requests with n > 1 leave whole, their samples merged
        on_result = samples.wrap(on_result)
        if self._ray is not None:
            results, self.last_metrics = self._ray.generate(
                requests, policy=policy, sampling=sampling, on_result=on_result,
                skip_ids=skip_ids)
            return samples.results({r.index: r for r in results})
        t0 = time.perf_counter()
        lead = self.replicas[0]
        if on_result is not None:
            lock = threading.Lock()
            user_on_result = on_result

            def on_result(result):  # replicas finish requests from several threads
                with lock:
                    user_on_result(result)

        live, done = lead.prepare(requests, sampling=sampling, on_result=on_result,
                                  skip_ids=skip_ids)
        sched = lead.sched_requests(live)
        budgets = lead.budgets()
        n = len(self.replicas)
        plan = queues = None
        if not live:
            work = [([], None)] * n
        elif policy == "batchllm":
            plan, queues = plan_replicas(sched, n, **lead.plan_options(policy))
            # Every group must fit one replica's budget: checked before any replica starts.
            check_kv_budget(sched, budgets, queues.groups)
            work = [(live, BatchLLMBatcher(sched, (), budgets, optimal_saving_ratio=
                                           plan.optimal_saving_ratio, plan_s=plan.plan_s,
                                           source=queues.source(r))) for r in range(n)]
        else:  # the baselines have no groups: input order in contiguous, even shares
            check_kv_budget(sched, budgets)  # before any replica starts, naming the job's index
            work = []
            for share in baseline_shares([len(r.prompt_token_ids) for r in sched],
                                         [r.max_tokens for r in sched], n):
                part = [live[i] for i in share]
                work.append((part, make_batcher(policy, [sched[i] for i in share], budgets)
                             if part else None))
        bar = None
        if live and lead.options.progress:
            from tqdm.auto import tqdm

            bar = _SharedBar(tqdm(total=len(live), unit="req", desc="generate",
                                  dynamic_ncols=True))
        per_replica: list[dict | None] = [None] * n
        errors: list[BaseException] = []

        def run(r: int) -> None:
            part, batcher = work[r]
            try:
                per_replica[r] = self.replicas[r].run(
                    part, batcher, done, on_result=on_result, t0=t0, policy=policy, bar=bar,
                    all_live=live, prefix_levels=plan.prefix_levels if plan else None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        if n == 1:
            run(0)
        else:
            threads = [threading.Thread(target=run, args=(r,), name=f"replica-{r}")
                       for r in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if bar is not None:
            bar.close()
        if errors:
            raise errors[0]
        wall = time.perf_counter() - t0
        metrics = merge_metrics(per_replica, wall_s=wall, plan=plan,
                                devices=[list(e.mesh.devices.flat) for e in self.replicas],
                                stolen=queues.stolen if queues is not None else (),
                                planned=queues.planned if queues is not None else ())
        metrics["failed_requests"] = sum(1 for r in done.values() if r.error is not None)
        metrics["policy"] = policy
        self.last_metrics = metrics
        return samples.results(done)

    def score(self, pairs, *, policy: str | None = None) -> list[engine_lib.Score]:
        """Each (context, continuation) pair's score, in one job over the replicas
        (`batchjax.engine.engine.score_pairs`)."""
        return engine_lib.score_pairs(self, pairs, policy=policy)


def generate(requests: Iterable[str | dict | Request], model: str = "smollm2-135m", *,
             policy: str = "batchllm", sampling: SamplingParams | None = None,
             **options) -> list[Result]:
    """One-shot: load `model`, run every request under `policy`, return results in input order.

    `tensor_parallel`, `data_parallel`, `distributed` and `ray_address` spread the job over
    chips and hosts; the other keywords are `batchjax.engine.Engine`'s."""
    return Engine(model, policy=policy, **options).generate(requests, sampling=sampling)
