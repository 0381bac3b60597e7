"""Data-parallel efficiency: one Ray replica on one core against two, each on a core of its own.

    python -m experiments.bench_scaleout [--model=smollm2-135m] [--num_requests=64] \
        [--prefix_len=256] [--distinct_len=32] [--output_len=32] [--sharing_degree=8] \
        [--replicas=1,2] [--cores=0,1] [--repeats=1] [--out=out/bench/scaleout.json]

The same shared-prefix workload (BatchLLM's microbenchmark: groups of `sharing_degree`
requests over a random `prefix_len`-token document, `distinct_len` tokens of their own, exactly
`output_len` output tokens each, EOS ignored) runs under the batchllm policy on D Ray replicas
for each D of `--replicas`; replica k is pinned to core `cores[k]` (its process's affinity is
set before JAX starts, and its thread pools sized to that core). Every arm first runs the job
once to compile its shapes, then `repeats` timed jobs; a job's time is the driver's, from the
call to the last result. Reports output tok/s, the speedup over the first arm (the ideal is D),
the parallel efficiency, the saving ratios, and how evenly the replicas were busy; prints a
Markdown table and writes JSON to `--out`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from batchjax import workloads
from batchjax.bench.suite import fixed_output

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model spec (name, .gguf, HF directory).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and KV.")
_NUM = flags.DEFINE_integer("num_requests", 64, "Requests (a multiple of sharing_degree).")
_PREFIX = flags.DEFINE_integer("prefix_len", 256, "Shared document tokens per group.")
_DISTINCT = flags.DEFINE_integer("distinct_len", 32, "Tokens of each request's own.")
_OUTPUT = flags.DEFINE_integer("output_len", 32, "Output tokens per request.")
_DEGREE = flags.DEFINE_integer("sharing_degree", 8, "Requests per shared document.")
_SEED = flags.DEFINE_integer("seed", 1, "Workload seed.")
_REPLICAS = flags.DEFINE_list("replicas", ["1", "2"], "Replica counts, one arm each.")
_CORES = flags.DEFINE_list("cores", [], "Core of each replica (default: this process's first "
                           "cores it may run on).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed jobs per arm after the compiling one "
                                "(the fastest is reported).")
_KV_MB = flags.DEFINE_float("kv_budget_mb", 64.0, "KV budget of each replica.")
_STEP_TOKENS = flags.DEFINE_integer("max_tokens_per_step", 256, "Token budget of a step.")
_PAGE = flags.DEFINE_integer("page_size", 16, "KV page size.")
_OUT = flags.DEFINE_string("out", "out/bench/scaleout.json", "JSON report.")


def _requests(vocab_size: int) -> tuple[str, list[dict]]:
    work = fixed_output(workloads.microbenchmark(
        _PREFIX.value, _DISTINCT.value, _OUTPUT.value, _DEGREE.value, _NUM.value,
        vocab_size=vocab_size, seed=_SEED.value))
    reqs = [{"id": f"r{i}", "prompt_token_ids": p.tolist(), "max_tokens": int(m),
             "ignore_eos": True} for i, (p, m) in enumerate(zip(work.prompts, work.max_tokens))]
    return work.name, reqs


def _arm(replicas: int, cores: list[int], reqs_for) -> dict:
    from batchjax.cluster.ray_cluster import RayReplicas

    with RayReplicas(_MODEL.value, data_parallel=replicas, ray_num_cpus=1,
                     ray_pin_cores=[[c] for c in cores[:replicas]], dtype=_DTYPE.value,
                     page_size=_PAGE.value, kv_budget_mb=_KV_MB.value,
                     max_tokens_per_step=_STEP_TOKENS.value, progress=False) as rr:
        name, reqs = reqs_for(rr.config.vocab_size)
        _, compiling = rr.generate(reqs)
        timed = [rr.generate(reqs)[1] for _ in range(max(1, _REPEATS.value))]
        best = min(timed, key=lambda m: m["wall_s"])
        return {
            "replicas": replicas,
            "cores": [info.get("cores") for info in rr.replica_info],
            "workload": name,
            "num_requests": len(reqs),
            "output_tokens": best["output_tokens"],
            "wall_s": best["wall_s"],
            "output_tokens_per_s": best["output_tokens_per_s"],
            "saving_ratio": best["saving_ratio"],
            "optimal_saving_ratio": best["optimal_saving_ratio"],
            "replica_balance": best["replica_balance"],
            "compiling_job_wall_s": compiling["wall_s"],
            "per_replica": best["replicas"],
            "all_wall_s": [m["wall_s"] for m in timed],
        }


def main(argv):
    del argv
    import ray

    counts = [int(c) for c in _REPLICAS.value]
    cores = [int(c) for c in _CORES.value] or sorted(os.sched_getaffinity(0))
    if max(counts) > len(cores):
        raise ValueError(f"{max(counts)} replicas need as many cores; have {cores}")
    if not ray.is_initialized():
        ray.init(num_cpus=max(counts), include_dashboard=False)
    arms = []
    for d in counts:
        arm = _arm(d, cores, _requests)
        arms.append(arm)
        print(f"{d} replica(s): {arm['output_tokens_per_s']:.1f} output tok/s "
              f"({arm['wall_s']:.2f} s)", flush=True)
    base = arms[0]
    for arm in arms:
        arm["speedup"] = arm["output_tokens_per_s"] / base["output_tokens_per_s"]
        arm["efficiency"] = arm["speedup"] / (arm["replicas"] / base["replicas"])
    report = {"model": _MODEL.value, "dtype": _DTYPE.value, "workload": base["workload"],
              "cpu_count": os.cpu_count(), "arms": arms}
    print()
    print(f"model {_MODEL.value} ({_DTYPE.value}), workload {base['workload']}, "
          f"{base['num_requests']} requests, {base['output_tokens']} output tokens")
    print()
    print("| replicas | cores | wall (s) | output tok/s | speedup | efficiency | saving ratio "
          "| optimal | balance |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm in arms:
        balance = "-" if arm["replica_balance"] is None else f"{arm['replica_balance']:.2f}"
        cores_used = ",".join(str(c[0]) if c and len(c) == 1 else str(c) for c in arm["cores"])
        print(f"| {arm['replicas']} | {cores_used} | {arm['wall_s']:.2f} | "
              f"{arm['output_tokens_per_s']:.1f} | {arm['speedup']:.2f}x | "
              f"{arm['efficiency']:.0%} | {arm['saving_ratio']:.1%} | "
              f"{arm['optimal_saving_ratio']:.1%} | {balance} |")
    if os.path.dirname(_OUT.value):
        os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
