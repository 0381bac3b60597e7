"""Runs one job under several mesh configurations in a process with N host devices.

    python -m tests.multidevice_worker MODEL N_DEVICES CONFIGS_JSON OUT_JSON [REQUESTS_JSON]

Multi-device tests run this in a subprocess: the host device count is fixed when JAX starts.
Each config is the keywords of `batchjax.cluster.Engine` (among them "placement", the embedding
table's and the LM head's split, "TABLE/HEAD") plus "policy" and "model" (another model than
MODEL); the output maps each config's index to its results' token ids and
its metrics. REQUESTS_JSON, a file holding a
list of requests, replaces the built-in job (a request's own max_tokens wins over a config's).
"""

import json
import os
import sys


def main(model: str, num_devices: int, configs: list[dict], out: str,
         requests_path: str | None = None) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={num_devices}")
    import numpy as np

    from batchjax.cluster import Engine

    rng = np.random.default_rng(0)
    requests = []
    for d in range(4):  # four documents, three questions each, and two unrelated prompts
        doc = rng.integers(3, 100, size=37).tolist()
        for q in range(3):
            requests.append({"id": f"d{d}q{q}", "prompt_token_ids":
                             doc + rng.integers(3, 100, size=int(rng.integers(1, 9))).tolist()})
    requests += [{"id": "u0", "prompt_token_ids": rng.integers(3, 100, size=21).tolist()},
                 {"id": "u1", "prompt_token_ids": [5]}]
    if requests_path is not None:
        with open(requests_path) as f:
            requests = json.load(f)
    results = {}
    for k, config in enumerate(configs):
        config = dict(config)
        policy = config.pop("policy", "batchllm")
        max_tokens = config.pop("max_tokens", 8)
        reqs = [{"max_tokens": max_tokens, **r, "ignore_eos": True} for r in requests]
        engine = Engine(config.pop("model", model), policy=policy, progress=False, **config)
        out_results = engine.generate(reqs)
        m = engine.last_metrics
        results[k] = {
            "ids": [r.id for r in out_results],
            "tokens": [list(r.token_ids) for r in out_results],
            "metrics": {key: m.get(key) for key in (
                "saving_ratio", "computed_prefill_tokens", "num_requests", "num_devices",
                "tensor_parallel", "data_parallel", "compiled_after_warmup", "replica_balance",
                "kv_budget_pages", "peak_kv_pages")},
            "placement": list(engine.replicas[0].step.placement),
            "replicas": m.get("replicas", []),
        }
        print(f"config {k} done", flush=True)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
