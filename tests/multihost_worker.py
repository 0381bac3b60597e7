"""One process of a multi-process job, run by tests/test_multihost.py.

    python -m tests.multihost_worker SPEC_JSON

SPEC_JSON: {"mode": "generate" | "agree", "coordinator": "host:port" (null: one process,
without jax.distributed), "num_processes", "process_id", "out": path, ...}.

"generate" ("model_dir", "requests", "engine": Engine options, "tensor_parallel"): builds the
engine on the global mesh, runs the requests and writes their token ids and some metrics.
"agree" ("requests", "leader_value"): writes what `broadcast_from_leader` gave and what
`check_same_inputs` said of this process's requests.
"""

from __future__ import annotations

import json
import sys


def _generate(spec: dict, multihost) -> dict:
    import jax

    from batchjax.engine.engine import Engine
    from batchjax.sharding.mesh import make_mesh

    tp = spec["tensor_parallel"]
    mesh = make_mesh(tp, 1, jax.devices())
    assert multihost.global_mesh(tp).devices.tolist() == mesh.devices.tolist()
    engine = Engine(spec["model_dir"], tensor_parallel=tp, mesh=mesh, **spec["engine"])
    requests = spec["requests"]
    multihost.check_same_inputs(requests)
    results = engine.generate(requests)
    return {
        "token_ids": [list(r.token_ids) for r in results],
        "errors": [None if r.error is None else str(r.error) for r in results],
        "weight_bytes_read": engine.weight_bytes_read,
        "metrics": {k: engine.last_metrics.get(k) for k in (
            "num_compiled_shapes", "compiled_after_warmup", "cpu_kernels", "tensor_parallel",
            "num_devices", "wall_s", "warmup_s")},
    }


def _agree(spec: dict, multihost) -> dict:
    out = {"from_leader": multihost.broadcast_from_leader(spec["leader_value"])}
    try:
        multihost.check_same_inputs(spec["requests"])
        out["check"] = None
    except multihost.MultihostError as e:
        out["check"] = str(e)
    return out


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from batchjax.cluster import multihost

    if spec.get("coordinator"):
        multihost.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"],
                             initialization_timeout=spec.get("initialization_timeout", 60))
    import jax

    run = {"generate": _generate, "agree": _agree}[spec.get("mode", "generate")]
    out = run(spec, multihost)
    out.update(process_id=jax.process_index(), num_processes=jax.process_count(),
               num_devices=len(jax.devices()), local_devices=len(jax.local_devices()),
               leader=multihost.is_leader())
    with open(spec["out"], "w") as f:
        json.dump(out, f)
    multihost.barrier("multihost_worker_done")
    multihost.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
