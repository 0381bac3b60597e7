"""Data-parallel replicas as Ray actors: `batchjax.cluster.Engine(distributed="ray")`.

One actor per replica, each a `batchjax.engine.Engine` on `tensor_parallel` devices of its own
(GPUs it asks Ray for, or host devices of its process on a CPU). The driver validates and
tokenizes (with the config and tokenizer replica 0 loaded), and a coordinator actor plans the
job once and holds its `ReplicaQueues`: each replica's batcher takes whole prefix groups from
it one at a time, as in the local path, and sends every finished `Result` back to it; the
driver drains them and calls `on_result` (the journal) in its own process, once per request.

Faults: a replica that dies mid-job (its process killed, its node lost) loses only what it had
not reported yet. The unreported requests of the groups it took, and the groups still waiting
in its queue, go to the survivors; a request that reported is never run again, and a report
that arrives after its replica was declared dead is dropped, so nothing is lost or reported
twice. The next `generate` replaces the dead actor.

The actors live as long as this object and serve every `generate` (their programs stay
compiled); `close()` ends them, and Ray ends them with the driver in any case. A Ray instance
this object started (no `ray_address` and none running) ends with the process.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import socket
import threading
import time
import types
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlparse

from batchjax.cluster.engine import SUMMED_METRICS, merge_metrics, plan_replicas
from batchjax.engine import engine as engine_lib
from batchjax.engine.results import Result
from batchjax.metrics import process_age_s
from batchjax.requests import Request, SamplingParams
from batchjax.schedule.batching import BatchLLMBatcher, BudgetTooSmall, check_kv_budget
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.replicas import baseline_shares
from batchjax.schedule.step_plan import Budgets

RAY_MISSING = 'distributed="ray" needs Ray, an optional extra: pip install -e ".[ray]"'
_PROBE_S = 5.0  # how long a ray_address has to answer
_DRAIN_S = 1.0  # a drain waits at most this long for a result (the driver waits on events)
_RECHECK_S = 1.0  # a replica whose queue was empty asks again after this long, or when dry
_ABANDON_S = 60.0  # after an error, how long runs get to stop before their actors are killed

# group id, prefix, request positions[, chain of (segment id, end)] (`Plan.group_work`)
GroupWork = tuple


def import_ray():
    """The `ray` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e
    return ray


def check_address(address: str) -> None:
    """Raises ConnectionError (or ValueError for a malformed one) unless something listens at
    `address` (`host:port` or `ray://host:port`; "auto" is left to Ray), within seconds:
    `ray.init` itself retries a dead address for minutes."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise ValueError(f"ray_address={address!r} is not host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=_PROBE_S):
            pass
    except OSError as e:
        raise ConnectionError(
            f"no Ray cluster answers at ray_address={address!r} ({host}:{port}: {e}); start "
            "one there with `ray start --head`, or leave ray_address unset for a local one"
        ) from None


def _connect(ray, address: str | None) -> None:
    if address is not None:
        check_address(address)  # a bad address fails here, before anything starts
        if ray.is_initialized():
            return  # this process is already connected: that cluster is used
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, SystemExit) as e:  # Ray exits on a lost GCS
            raise ConnectionError(f"could not join the Ray cluster at ray_address={address!r}: "
                                  f"{e}") from None
    elif not ray.is_initialized():
        # "local": a new cluster in this process, never one a `ray start` left behind
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)


def check_fits(ray, data_parallel: int, per_replica: dict[str, float],
               wait_s: float = 10.0) -> None:
    """Raises ValueError unless `data_parallel` actors needing `per_replica` resources each
    can be placed (each on one node, all at once). Where the cluster could hold them but
    they are not free yet, waits up to `wait_s` (resources of actors just ended come back)."""
    need = {k: v for k, v in per_replica.items() if v > 0}
    if not need:
        return
    deadline = time.monotonic() + wait_s
    while True:
        avail = ray.available_resources()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        room = sum(min(math.floor(res.get(k, 0) / v) for k, v in need.items()) for res in nodes)
        free = all(avail.get(k, 0) >= v * data_parallel for k, v in need.items())
        if room >= data_parallel and free:
            return
        if room < data_parallel or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    want = ", ".join(f"{v:g} {k}" for k, v in need.items())
    have = ", ".join(f"{avail.get(k, 0):g} {k}" for k in need)
    raise ValueError(
        f"data_parallel={data_parallel} replicas of {want} each do not fit this Ray cluster: "
        f"{have} free on {len(nodes)} node(s), which hold {room} replica(s) when idle; lower "
        "data_parallel or tensor_parallel, free the cluster, or add nodes")


def _tokenizer_from(parts: dict | None):
    if parts is None:
        return None
    import tokenizers

    from batchjax.models.tokenizer import Tokenizer

    return Tokenizer(tokenizers.Tokenizer.from_str(parts.pop("backend")), **parts)


# -- the coordinator: the job's queues and what has been reported of it ------------------------


class _Coordinator:
    """A Ray actor (threaded): plans each job, hands out its groups, collects its results.

    Request positions index the job's list of requests to run (`RayReplicas.generate`'s
    `live`). A call naming another job than the current one is a straggler and is ignored.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._job = None

    def start(self, job: int, sched, policy: str, num_replicas: int, budgets: Budgets,
              plan_options: dict | None = None) -> dict:
        """Plans the job; a group over one replica's `budgets` is named in "budget_error"
        (no work is handed out then)."""
        with self._cond:
            self._job = job
            self._queues = None
            self._overflow: collections.deque[GroupWork] = collections.deque()
            self._taken: list[list[GroupWork]] = [[] for _ in range(num_replicas)]
            self._reported: dict[int, int] = {}  # position -> replica
            self._new: list[tuple[int, tuple[int, Result]]] = []
            self._dead: set[int] = set()
            self._aborted = False
            self._runs: dict[tuple[int, int], dict] = {}
            if policy == "batchllm":
                plan, queues = plan_replicas(sched, num_replicas, **(plan_options or {}))
                try:
                    check_kv_budget(sched, budgets, queues.groups)
                except BudgetTooSmall as e:
                    return {"budget_error": str(e)}
                self._queues = queues
                return {"plan": {"num_groups": plan.num_groups, "plan_s": plan.plan_s,
                                 "optimal_saving_ratio": plan.optimal_saving_ratio,
                                 "prefix_levels": plan.prefix_levels,
                                 "num_prefix_nodes": plan.num_prefix_nodes},
                        "shares": None}
            # The baselines have no groups: input order in contiguous, even shares.
            shares = baseline_shares([len(r.prompt_token_ids) for r in sched],
                                     [r.max_tokens for r in sched], num_replicas)
            for r, share in enumerate(shares):
                self._taken[r].append((-1, (), tuple(share)))
            return {"plan": None, "shares": shares}

    def take(self, job: int, replica: int, dry: bool) -> GroupWork | None:
        with self._cond:
            if job != self._job or self._aborted or replica in self._dead:
                return None
            if self._overflow:  # a dead replica's work first: it has waited longest
                group = self._overflow.popleft()
            elif self._queues is not None:
                group = self._queues.take(replica, dry)
            else:
                group = None
            if group is not None:
                self._taken[replica].append(group)
            return group

    def assign(self, job: int, replica: int, share: Sequence[int]) -> None:
        """A baseline's share of requests, about to be run by `replica`."""
        with self._cond:
            if job == self._job:
                self._taken[replica].append((-1, (), tuple(share)))

    def report(self, job: int, replica: int, run: int, items, counters) -> None:
        with self._cond:
            if job != self._job or replica in self._dead:
                return
            rec = self._runs.setdefault((replica, run), {
                "counters": None, "num_results": 0, "output_tokens": 0,
                "finished_prompt_tokens": 0})
            rec["counters"] = counters
            for pos, result in items:
                if pos in self._reported:
                    continue
                self._reported[pos] = replica
                self._new.append((replica, result))
                rec["num_results"] += 1
                rec["output_tokens"] += result.completion_tokens
                rec["finished_prompt_tokens"] += result.prompt_tokens
            if self._new:
                self._cond.notify_all()

    def drain(self, job: int, timeout: float) -> list[tuple[int, Result]]:
        """(replica, result) of every result reported since the last drain; waits up to
        `timeout` for one when there is none."""
        with self._cond:
            if job != self._job:
                return []
            if not self._new:
                self._cond.wait(timeout)
            new, self._new = self._new, []
            return new

    def fail(self, job: int, replica: int) -> dict:
        """`replica` is dead: its unreported work goes to the overflow queue (batchllm), or
        back to the driver (baselines' shares). Its later reports are dropped."""
        with self._cond:
            if job != self._job or replica in self._dead:
                return {"rerun": [], "moved": []}
            self._dead.add(replica)
            rerun = []
            for group in self._taken[replica]:
                left = tuple(i for i in group[2] if i not in self._reported)
                if left:  # the same group (and chain of segments), less what reported
                    rerun.append(group[:2] + (left,) + group[3:])
            self._taken[replica] = []
            moved = []
            if self._queues is not None:
                while (group := self._queues.take(replica, dry=False)) is not None:
                    moved.append(group)
                self._overflow.extend(rerun + moved)
            return {"rerun": rerun, "moved": moved}

    def has_work(self, job: int) -> bool:
        """Whether work waits that no running replica owns (a dead replica's)."""
        with self._cond:
            return job == self._job and bool(self._overflow)

    def abort(self, job: int) -> None:
        with self._cond:
            if job == self._job:
                self._aborted = True

    def summary(self, job: int) -> dict:
        with self._cond:
            n = len(self._taken)
            return {"runs": dict(self._runs), "num_reported": len(self._reported),
                    "stolen": list(self._queues.stolen) if self._queues is not None else [0] * n,
                    "planned": list(self._queues.planned) if self._queues is not None else []}


# -- a replica --------------------------------------------------------------------------------


class _NoBar:
    """The replica's progress bar: the driver shows the job's."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _CoordinatorSource:
    """The coordinator's queues seen by one replica's batcher (a `GroupSource`)."""

    def __init__(self, ray, coordinator, job: int, replica: int):
        self._ray, self._coord, self._job, self._replica = ray, coordinator, job, replica
        self._empty_until = 0.0

    def take(self, dry: bool = True) -> GroupWork | None:
        now = time.perf_counter()
        if not dry and now < self._empty_until:
            return None
        group = self._ray.get(self._coord.take.remote(self._job, self._replica, dry))
        if group is None and not dry:
            self._empty_until = now + _RECHECK_S
        return group


class _Reporter:
    """Sends each finished result to the coordinator as it finishes (without waiting), with
    the batcher's counters so far; `close` waits until every report has landed."""

    def __init__(self, ray, coordinator, job: int, replica: int, run: int, batcher,
                 pos_of: dict[int, int], crash_after: int | None):
        self._ray, self._coord = ray, coordinator
        self._key = (job, replica, run)
        self._batcher, self._pos_of = batcher, pos_of
        self._crash_after = crash_after
        self._refs: list = []
        self._count = 0

    def add(self, result: Result) -> None:
        counters = self._batcher.metrics() if self._batcher is not None else None
        self._refs.append(self._coord.report.remote(
            *self._key, [(self._pos_of[result.index], result)], counters))
        self._count += 1
        if self._count % 64 == 0:  # forget the reports that have landed
            _, self._refs = self._ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        if self._crash_after is not None and self._count >= self._crash_after:
            self.close()
            os._exit(1)  # the fault-injection hook: die with the rest of the run unreported

    def close(self) -> None:
        self._ray.get(self._refs)
        self._refs = []


def _pin(cores: set[int]) -> None:
    """Pins every thread of this process to `cores` (and the threads it starts later): before
    JAX starts, so XLA sizes its thread pools to them."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that just ended
            pass
    os.sched_setaffinity(0, cores)


class _Replica:
    """A Ray actor: one data-parallel replica, a `batchjax.engine.Engine` in its own process."""

    def __init__(self, model: str, policy: str, tensor_parallel: int, options: dict,
                 cores: Sequence[int] | None):
        if cores:
            _pin(set(cores))
        self._crash_after: int | None = None
        self._error: BaseException | None = None
        try:
            self._engine = engine_lib.Engine(model, policy=policy,
                                             tensor_parallel=tensor_parallel, **options)
        except Exception as e:  # noqa: BLE001 - raised by `info`, as itself, in the driver
            self._error = e

    def info(self) -> dict:
        import ray

        if self._error is not None:
            raise self._error
        e = self._engine
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "devices": [str(d) for d in e.mesh.devices.flat],
                "cores": sorted(os.sched_getaffinity(0)), "kv_budget_pages": e.kv_budget_pages}

    def model_info(self):
        """The config, and the tokenizer as the parts it is built from (its compiled chat
        template does not pickle)."""
        tok = self._engine.tokenizer
        parts = None if tok is None else {
            "backend": tok.backend.to_str(), "eos_token_ids": list(tok.eos_token_ids),
            "chat_template": tok.chat_template, "bos_token": tok.bos_token,
            "eos_token": tok.eos_token}
        return self._engine.config, parts

    def crash_after_results(self, n: int | None) -> None:
        """Test hook: the next run exits the process once it has reported `n` results."""
        self._crash_after = n

    def run(self, replica: int, job: int, run: int, coordinator, requests: list, policy: str,
            share: Sequence[int] | None, plan: dict | None) -> dict:
        """Runs groups taken from `coordinator` (`share` None) or a baseline's `share` of the
        job's requests (`requests[0]`, their token ids already in: nothing is tokenized here)."""
        import ray

        age0 = process_age_s()
        t0 = time.perf_counter()
        e = self._engine
        live = [e.prepare_one(r) for r in ray.get(requests[0])]
        bad = next((st for st in live if isinstance(st, Result)), None)
        if bad is not None:
            raise RuntimeError(f"replica {replica} rejects request {bad.id!r}, which the "
                               f"driver accepted: {bad.error.message}")
        pos_of = {st.request.index: k for k, st in enumerate(live)}
        sched = e.sched_requests(live)
        budgets = e.budgets()
        if share is None:
            part = live
            batcher = BatchLLMBatcher(
                sched, (), budgets, optimal_saving_ratio=plan["optimal_saving_ratio"],
                plan_s=plan["plan_s"], source=_CoordinatorSource(ray, coordinator, job, replica))
        else:
            part = [live[i] for i in share]
            batcher = make_batcher(policy, [sched[i] for i in share], budgets) if part else None
        crash, self._crash_after = self._crash_after, None
        reporter = _Reporter(ray, coordinator, job, replica, run, batcher, pos_of, crash)
        metrics = e.run(part, batcher, {}, on_result=reporter.add, t0=t0, policy=policy,
                        bar=_NoBar(), all_live=live,
                        prefix_levels=plan["prefix_levels"] if share is None else None)
        reporter.close()
        if metrics.get("startup_s") is not None and age0 is not None:
            metrics["run_start_to_first_step_s"] = metrics["startup_s"] - age0
        return metrics


# -- the driver --------------------------------------------------------------------------------


_RUN_SUMS = ("busy_s", "prefill_s", "decode_s", "compiling_s", "device_idle_s",
             "finished_prompt_tokens", "wall_s")


def _combine_runs(runs: Sequence[dict]) -> dict:
    """One replica's metrics from its runs in a job (more than one after a failover)."""
    m = dict(runs[0])
    if len(runs) == 1:
        return m
    for key in SUMMED_METRICS + _RUN_SUMS:
        if any(key in r for r in runs):
            m[key] = sum(r.get(key) or 0 for r in runs)
    for key, pick in (("peak_kv_pages", max), ("num_compiled_shapes", max), ("warmup_s", max),
                      ("time_to_last_result_s", max), ("startup_s", min),
                      ("time_to_first_result_s", min), ("run_start_to_first_step_s", min)):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            m[key] = pick(values)
    return m


def _dead_run(rec: dict | None, tensor_parallel: int) -> dict:
    """What is known of a run whose actor died: its counters at its last report."""
    if rec is None:
        return {"num_requests": 0, "output_tokens": 0, "num_devices": tensor_parallel}
    m = dict(rec["counters"] or {})
    m.update(output_tokens=rec["output_tokens"],
             finished_prompt_tokens=rec["finished_prompt_tokens"], busy_s=None,
             num_devices=tensor_parallel)
    return m


class RayReplicas:
    """`data_parallel` replicas of `batchjax.engine.Engine` as Ray actors; see the module doc.

    `options` are `batchjax.engine.Engine`'s, plus these of Ray's:
    `ray_num_cpus`: CPUs each replica asks Ray for (default: `tensor_parallel` on a CPU
    cluster, 1 with GPUs); `ray_num_gpus`: GPUs each asks for (default: `tensor_parallel` when
    the cluster has GPUs, else 0, and then each replica runs on host devices);
    `ray_pin_cores`: one list of CPU cores per replica, its process pinned to them;
    `ray_env_vars`: more environment variables for every replica's process.
    """

    def __init__(self, model: str = "smollm2-135m", *, policy: str = "batchllm",
                 tensor_parallel: int = 1, data_parallel: int = 1,
                 ray_address: str | None = None, ray_num_cpus: float | None = None,
                 ray_num_gpus: float | None = None,
                 ray_pin_cores: Sequence[Sequence[int]] | None = None,
                 ray_env_vars: dict[str, str] | None = None, **options):
        ray = import_ray()
        for name, n in (("tensor_parallel", tensor_parallel), ("data_parallel", data_parallel)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        if ray_pin_cores is not None and len(ray_pin_cores) != data_parallel:
            raise ValueError(f"ray_pin_cores gives {len(ray_pin_cores)} core lists for "
                             f"data_parallel={data_parallel} replicas")
        self.options = engine_lib.EngineOptions(**options)  # a bad option fails before work
        _connect(ray, ray_address)
        self._rayapi = ray
        gpus = ray_num_gpus if ray_num_gpus is not None else (
            tensor_parallel if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
        cpus = ray_num_cpus if ray_num_cpus is not None else (1 if gpus else tensor_parallel)
        check_fits(ray, data_parallel, {"CPU": cpus, "GPU": gpus})
        env = {"JAX_PLATFORMS": "cpu"} if not gpus else {}
        if not gpus and tensor_parallel > 1:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(
                flags + [f"--xla_force_host_platform_device_count={tensor_parallel}"])
        env.update(ray_env_vars or {})
        self._resources = {"num_cpus": cpus, "num_gpus": gpus}
        self._env = env
        self._pin = [list(c) for c in ray_pin_cores] if ray_pin_cores is not None else None
        self._model, self._policy = model, policy
        self.tensor_parallel, self.data_parallel = tensor_parallel, data_parallel
        self._actor_options = {**options, "progress": False}
        self._job = 0
        self._dead: set[int] = set()
        self.actors: list = [None] * data_parallel
        self.replica_info: list[dict] = [{}] * data_parallel
        # Which replica finished each request of the last job (the test hooks kill by it).
        self.replica_of: dict[str, int] = {}
        self._coordinator = ray.remote(_Coordinator).options(
            num_cpus=0, max_concurrency=32).remote()
        try:
            self._spawn(range(data_parallel))
            self.config, parts = ray.get(self.actors[0].model_info.remote())
        except BaseException:
            self.close()
            raise
        self.tokenizer = _tokenizer_from(parts)
        self._host = engine_lib.RequestPreparer(self.config, self.tokenizer)

    def _spawn(self, replicas: Iterable[int]) -> None:
        ray = self._rayapi
        replicas = list(replicas)
        for r in replicas:
            env = dict(self._env)
            if self._pin is not None:
                threads = str(len(self._pin[r]))
                env.setdefault("OMP_NUM_THREADS", threads)
                env.setdefault("MKL_NUM_THREADS", threads)
            self.actors[r] = ray.remote(_Replica).options(
                **self._resources, runtime_env={"env_vars": env}, max_restarts=0,
                max_task_retries=0).remote(
                    self._model, self._policy, self.tensor_parallel, self._actor_options,
                    self._pin[r] if self._pin is not None else None)
        infos = ray.get([self.actors[r].info.remote() for r in replicas])
        for r, info in zip(replicas, infos):
            self.replica_info[r] = info
            self._dead.discard(r)

    def close(self) -> None:
        """Ends this object's actors (nothing else of the cluster)."""
        ray = self._rayapi
        ends = []
        for handle in [*self.actors, getattr(self, "_coordinator", None)]:
            if handle is not None:
                try:
                    ray.kill(handle)
                    ends.append(handle.__ray_ready__.remote())  # fails once it is gone
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if ends:  # so that what they held is free for the next user
            ray.wait(ends, num_returns=len(ends), timeout=10)
        self.actors = [None] * self.data_parallel
        self._coordinator = None

    def __enter__(self) -> "RayReplicas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        requests: Iterable[str | dict | Request],
        *,
        policy: str | None = None,
        sampling: SamplingParams | None = None,
        on_result: Callable[[Result], None] | None = None,
        skip_ids: frozenset[str] = frozenset(),
    ) -> tuple[list[Result], dict[str, Any]]:
        """(every request's result in input order, the job's metrics), as
        `batchjax.cluster.Engine.generate` on replicas in this process."""
        if self._coordinator is None:
            raise RuntimeError("this RayReplicas is closed")
        ray = self._rayapi
        policy = policy or self._policy
        t0 = time.perf_counter()
        live, done = self._host.prepare(requests, sampling=sampling, on_result=on_result,
                                        skip_ids=skip_ids)
        if self._dead:  # replaced before the job, so every replica starts it
            self._spawn(sorted(self._dead))
        self._job += 1
        job, n = self._job, self.data_parallel
        self.replica_of = {}
        if not live:
            m = merge_metrics([{"policy": policy, "num_requests": 0}] * n,
                              wall_s=time.perf_counter() - t0)
            m.update(self._job_metrics(policy, done, 0, 0))
            return [done[i] for i in sorted(done)], m
        sched = self._host.sched_requests(live)
        # The replicas get token ids: they never tokenize, and see exactly the driver's prompts.
        to_run = [dataclasses.replace(st.request, prompt=None, messages=None,
                                      prompt_token_ids=st.prompt_ids) for st in live]
        requests_ref = ray.put(to_run)
        coord = self._coordinator
        plan_options = ({"prefix_levels": self.options.prefix_levels,
                         "min_saved_tokens": self.options.min_saved_tokens}
                        if policy == "batchllm" else None)
        o = self.options
        budgets = Budgets(o.max_tokens_per_step, self.replica_info[0]["kv_budget_pages"],
                          o.page_size, max_num_seqs=o.max_num_seqs)  # as each replica's
        if policy != "batchllm":  # before any replica starts, naming the job's index
            check_kv_budget(sched, budgets)
        started = ray.get(coord.start.remote(job, sched, policy, n, budgets, plan_options))
        if "budget_error" in started:
            raise BudgetTooSmall(started["budget_error"])
        plan_info = started["plan"]
        run_ids = itertools.count()
        runs: dict[Any, tuple[int, int]] = {}  # in flight: ref -> (replica, run)
        inflight = [0] * n
        finished: list[list[dict]] = [[] for _ in range(n)]
        died: dict[int, list[int]] = collections.defaultdict(list)  # replica -> its dead runs
        failures = rerun = 0
        age_launch = process_age_s()

        def launch(r: int, share: Sequence[int] | None) -> None:
            k = next(run_ids)
            ref = self.actors[r].run.remote(r, job, k, coord, [requests_ref], policy,
                                            None if share is None else list(share), plan_info)
            runs[ref] = (r, k)
            inflight[r] += 1

        def alive() -> list[int]:
            return [r for r in range(n) if r not in self._dead]

        def failed(r: int) -> None:
            nonlocal failures, rerun
            if r in self._dead:
                return
            self._dead.add(r)
            failures += 1
            try:  # dead already, or unreachable: either way it must not run on unseen
                ray.kill(self.actors[r])
            except Exception:  # noqa: BLE001 - gone
                pass
            lost = ray.get(coord.fail.remote(job, r))
            rerun += sum(len(group[2]) for group in lost["rerun"])
            survivors = alive()
            if not survivors:
                raise RuntimeError(
                    f"every Ray replica died; {outstanding} request(s) have no result (those "
                    "that finished reached on_result: a rerun with the same journal resumes)")
            if plan_info is None and lost["rerun"]:  # a baseline: the rest of its shares
                ids = sorted(i for group in lost["rerun"] for i in group[2])
                cuts = baseline_shares([len(sched[i].prompt_token_ids) for i in ids],
                                       [sched[i].max_tokens for i in ids], len(survivors))
                for s, cut in zip(survivors, cuts):
                    if cut:
                        share = [ids[j] for j in cut]
                        ray.get(coord.assign.remote(job, s, share))
                        launch(s, share)

        for r in range(n):
            launch(r, None if plan_info is not None else started["shares"][r])
        bar = None
        if self.options.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(live), unit="req", desc="generate", dynamic_ncols=True)
        outstanding = len(live)
        first_age = last_age = None
        drain = None  # (the coordinator's answer to come, whether every run had ended)

        def take_results(items) -> None:
            nonlocal outstanding, first_age, last_age
            for r, result in items:
                if result.index in done:
                    continue  # the coordinator already drops repeats
                done[result.index] = result
                self.replica_of[result.id] = r
                outstanding -= 1
                last_age = process_age_s()
                first_age = last_age if first_age is None else first_age
                if bar is not None:
                    bar.update(1)
                if on_result is not None:
                    on_result(result)

        try:
            while outstanding or runs:
                if outstanding and drain is None:
                    drain = (coord.drain.remote(job, _DRAIN_S), not runs)
                # Sleep until results come, a run ends, or a replica dies: nothing polls.
                waiting = ([drain[0]] if drain is not None else []) + list(runs)
                ray.wait(waiting, num_returns=1)
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
                ready = set(ready)
                if drain is not None and drain[0] in ready:
                    items, quiet = ray.get(drain[0]), drain[1]
                    drain = None
                    take_results(items)
                    if quiet and not items and not runs and outstanding and not (
                            plan_info is not None and ray.get(coord.has_work.remote(job))):
                        # Every run ended and reported (a run waits for its reports to
                        # land), and no work is left over: nothing can bring the rest.
                        raise RuntimeError(f"{outstanding} request(s) were never run")
                ended = [ref for ref in runs if ref in ready]
                for ref in ended:
                    r, k = runs.pop(ref)
                    inflight[r] -= 1
                    try:
                        finished[r].append(ray.get(ref))
                    except ray.exceptions.RayActorError:
                        died[r].append(k)
                        failed(r)
                if plan_info is not None and ended and outstanding:
                    idle = [r for r in alive() if not inflight[r]]
                    if idle and ray.get(coord.has_work.remote(job)):
                        for r in idle:
                            launch(r, None)
        except BaseException:
            self._abandon(job, runs)
            raise
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        summary = ray.get(coord.summary.remote(job))
        per_replica = []
        for r in range(n):
            parts = finished[r] + [_dead_run(summary["runs"].get((r, k)), self.tensor_parallel)
                                   for k in died.get(r, ())]
            per_replica.append(_combine_runs(parts) if parts else {"num_requests": 0})
        m = merge_metrics(per_replica, wall_s=wall,
                          plan=types.SimpleNamespace(**plan_info) if plan_info else None,
                          devices=[info.get("devices", ()) for info in self.replica_info],
                          stolen=summary["stolen"], planned=summary["planned"])
        complete = next((x for runs_ in finished for x in runs_), {})
        for key, value in complete.items():  # a dead first replica has no engine-wide keys
            m.setdefault(key, value)
        for key in ("run_start_to_first_step_s", "finished_prompt_tokens"):
            m.pop(key, None)
        firsts = [p.get("run_start_to_first_step_s") for p in per_replica
                  if p.get("run_start_to_first_step_s") is not None]
        m["startup_s"] = age_launch + min(firsts) if firsts and age_launch is not None else None
        m["time_to_first_result_s"] = first_age
        m["time_to_last_result_s"] = last_age
        m.update(self._job_metrics(policy, done, failures, rerun))
        reported = collections.Counter(self.replica_of.values())
        for k, entry in enumerate(m["replicas"]):
            info = self.replica_info[k]
            entry.update(node=info.get("node"), pid=info.get("pid"), cores=info.get("cores"),
                         reported_requests=reported.get(k, 0), failed=k in died,
                         runs=len(finished[k]) + len(died.get(k, ())))
        return [done[i] for i in sorted(done)], m

    def _job_metrics(self, policy: str, done: dict, failures: int, rerun: int) -> dict:
        return {"policy": policy, "distributed": "ray", "replica_failures": failures,
                "rerun_requests": rerun,
                "failed_requests": sum(1 for r in done.values() if r.error is not None)}

    def _abandon(self, job: int, runs: dict) -> None:
        """After an error: stop handing out work, give the runs a while to end, then kill the
        actors still in them (they are replaced by the next `generate`)."""
        ray = self._rayapi
        try:
            ray.get(self._coordinator.abort.remote(job))
            _, stuck = ray.wait(list(runs), num_returns=len(runs), timeout=_ABANDON_S) \
                if runs else ([], [])
        except Exception:  # noqa: BLE001 - the error being raised matters more
            stuck = list(runs)
        for ref in stuck:
            r, _ = runs[ref]
            if r not in self._dead:
                try:
                    ray.kill(self.actors[r])
                except Exception:  # noqa: BLE001
                    pass
                self._dead.add(r)
