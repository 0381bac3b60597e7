"""The BatchLLM paper's setups, simulated: batchllm vs vllm vs sglang on a roofline A100-80GB.

python -m experiments.reproduce_paper --out=results/paper

Every time here is a roofline estimate (batchjax/sim), not a measurement; token counts and
saving ratios are exact replays of the batchers. The paper's figures (DESIGN.md) are printed
beside ours.
"""

import concurrent.futures
import json
import os

from absl import app, flags

from batchjax import workloads
from batchjax.sim.simulate import simulate

_OUT = flags.DEFINE_string("out", None, "Directory for results.json and results.md.")
_DEVICE = flags.DEFINE_string("device", "a100-80gb", "Simulated device.")
_MODELS = flags.DEFINE_list("models", ["llama-3.1-8b", "qwen-2.5-7b", "qwen-2.5-14b"],
                            "Model shapes.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 6400, "Requests per microbenchmark.")
_SWEEP_REQUESTS = flags.DEFINE_integer("sweep_requests", 6400,
                                       "Requests per point of the long-prefix sweep.")
_INDUSTRY_REQUESTS = flags.DEFINE_integer("industry_requests", 8000, "Industry-like requests.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Parallel simulations.")

POLICIES = ("batchllm", "vllm", "sglang")
SHAPES = ((2000, 200), (2000, 1000), (1000, 1000))  # (prefix, distinct) tokens
DEGREES = (4, 16)
SWEEP_PREFIXES = (1000, 2000, 4000, 8000, 16000)  # distinct 200, degree 16

# The paper's figures (final version, A100), as DESIGN.md lists them.
PAPER = {
    ("micro", 2000, 200, 16): "saving: BatchLLM 85.2% (bound), vLLM 40.1%",
    ("sweep", 16000, 200, 16): "saving: BatchLLM 92.6%, vLLM 6.3%, SGLang 5.2%",
    ("industry",): "Qwen-2.5-7B throughput: BatchLLM 8.67 vs vLLM (+chunked +prefix) 6.71 = 1.30x",
}
PAPER_RANGE = "microbenchmarks: BatchLLM 1.3x to 10.8x over vLLM and SGLang"


def _workload(spec: tuple) -> workloads.Workload:
    kind = spec[0]
    if kind == "industry":
        return workloads.industry_like(spec[1])
    _, prefix, distinct, degree, num_requests = spec
    return workloads.microbenchmark(prefix, distinct, 100, degree, num_requests)


def _run(task: tuple) -> dict:
    model, spec, policy = task
    metrics = simulate(_workload(spec), policy, _DEVICE.value, model).metrics
    metrics["spec"] = list(spec)
    return metrics


def _tasks() -> list[tuple]:
    specs = []
    for prefix, distinct in SHAPES:
        for degree in DEGREES:
            specs.append(("micro", prefix, distinct, degree, _NUM_REQUESTS.value))
    specs.append(("industry", _INDUSTRY_REQUESTS.value))
    tasks = [(m, s, p) for m in _MODELS.value for s in specs for p in POLICIES]
    sweep_model = _MODELS.value[0]
    for prefix in SWEEP_PREFIXES:
        spec = ("sweep", prefix, 200, 16, _SWEEP_REQUESTS.value)
        tasks += [(sweep_model, spec, p) for p in POLICIES]
    return tasks


def _label(spec: list) -> str:
    if spec[0] == "industry":
        return f"industry-like, {spec[1]} req"
    kind, prefix, distinct, degree, n = spec
    return f"{kind} {prefix}/{distinct} x{degree}, {n} req"


def _table(results: list[dict]) -> str:
    rows = {}
    for m in results:
        rows.setdefault((m["model"], tuple(m["spec"])), {})[m["policy"]] = m
    lines = [
        "| model | workload | saving batchllm / vllm / sglang (optimal) | output tok/s "
        "batchllm / vllm / sglang (simulated) | batchllm / vllm | batchllm / sglang | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, spec), by in rows.items():
        b, v, s = by["batchllm"], by["vllm"], by["sglang"]
        key = (spec[0],) if spec[0] == "industry" else spec[:4]
        paper = PAPER.get(key, "")
        lines.append(
            f"| {model} | {_label(list(spec))} | {b['saving_ratio']:.1%} / {v['saving_ratio']:.1%}"
            f" / {s['saving_ratio']:.1%} ({b['optimal_saving_ratio']:.1%}) | "
            f"{b['output_tokens_per_s']:,.0f} / {v['output_tokens_per_s']:,.0f} / "
            f"{s['output_tokens_per_s']:,.0f} | "
            f"{b['output_tokens_per_s'] / v['output_tokens_per_s']:.2f}x | "
            f"{b['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x | {paper} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    tasks = _tasks()
    with concurrent.futures.ProcessPoolExecutor(_WORKERS.value) as pool:
        results = list(pool.map(_run, tasks))
    table = _table(results)
    header = (
        f"SIMULATED on a roofline {_DEVICE.value} (times are estimates, not measurements); "
        f"paper: {PAPER_RANGE}"
    )
    print(header)
    print(table)
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(_OUT.value, "results.md"), "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    app.run(main)
