"""One job over several hosts: JAX's multi-controller mode, one process per host.

Every host runs the same program: `initialize(...)` first, before anything touches a JAX
device, then the same `Engine` on the global mesh (`global_mesh`), then the same `generate`
over the same requests. Each process plans the same steps from the same requests, so each
calls the same compiled programs with the same inputs; the model's collectives (the row-
parallel all-reduce, the vocabulary all-gather) cross hosts, and every process ends with every
result. One process writes them (`is_leader`).

    from batchjax.cluster import multihost
    from batchjax.engine.engine import Engine

    multihost.initialize("10.0.0.1:8476", num_processes=2, process_id=RANK)
    engine = Engine(model_dir, tensor_parallel=2, mesh=multihost.global_mesh(2))
    multihost.check_same_inputs(requests)        # a mismatch would hang or mix results
    results = engine.generate(requests)
    if multihost.is_leader():
        write(results)

On CPU hosts the cross-process collectives run over Gloo (TCP), which must be chosen before
the CPU backend starts; `initialize` does that. On GPU and TPU hosts JAX runs the accelerator's
own collectives. Only tensor parallelism spans processes: every process takes part in every
step, so a job has one replica (`data_parallel=1`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

CPU_COLLECTIVES = ("gloo", "mpi")


class MultihostError(RuntimeError):
    """The multi-process job cannot start, or its processes disagree."""


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without that helper: let JAX decide
        return False


def _platforms() -> list[str]:
    """The platforms JAX is told to use (empty: any it finds), without starting a backend."""
    value = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return [p.strip().lower() for p in value.split(",") if p.strip()]


def _may_use_cpu() -> bool:
    platforms = _platforms()
    return not platforms or "cpu" in platforms


def is_initialized() -> bool:
    """Whether this process has joined a multi-process job (`initialize`)."""
    from jax._src import distributed

    return distributed.global_state.client is not None


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids: Sequence[int] | None = None,
               cpu_collectives: str | None = None, initialization_timeout: int = 300) -> None:
    """Joins this process to a job of `num_processes` (one per host), as `process_id`.

    `coordinator_address`: "host:port" of process 0, which serves the coordination service
    there; every process passes the same one. Call it first, before anything touches a JAX
    device (`jax.devices()`, an array, loading a model). Where JAX may run on the CPU, the
    cross-process CPU collectives are set first: `cpu_collectives` ("gloo", or "mpi" where
    JAX has it; default: the one JAX is configured with, else "gloo").
    `initialization_timeout`: seconds to wait for every process to join before failing.
    """
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise MultihostError(f"coordinator_address must be 'host:port' of process 0, got "
                             f"{coordinator_address!r}")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MultihostError(f"coordinator_address must be 'host:port' of process 0, got "
                             f"{coordinator_address!r}")
    for name, n in (("num_processes", num_processes), ("process_id", process_id)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise MultihostError(f"{name} must be an integer, got {n!r}")
    if num_processes < 1:
        raise MultihostError(f"num_processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise MultihostError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if cpu_collectives is None:
        configured = jax.config.jax_cpu_collectives_implementation
        cpu_collectives = configured if configured in CPU_COLLECTIVES else "gloo"
    if cpu_collectives not in CPU_COLLECTIVES:
        raise MultihostError(f"cpu_collectives must be one of {CPU_COLLECTIVES}, got "
                             f"{cpu_collectives!r}")
    if is_initialized():
        raise MultihostError("this process has already joined a multi-process job")
    if _backends_started():
        raise MultihostError(
            "initialize() must run before anything touches a JAX device (jax.devices(), an "
            "array, loading a model): this process has already started its JAX backends")
    if _may_use_cpu():
        # Read when the CPU backend is created. Without cross-process collectives a program
        # over several processes' CPUs fails ("Multiprocess computations aren't implemented
        # on the CPU backend").
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes=int(num_processes), process_id=int(process_id),
            local_device_ids=None if local_device_ids is None else list(local_device_ids),
            initialization_timeout=initialization_timeout)
    except Exception as e:  # noqa: BLE001 - the reason is JAX's; the context is ours
        raise MultihostError(
            f"process {process_id} of {num_processes} could not join the job at "
            f"{coordinator_address} (is process 0 running and the port reachable from every "
            f"host?): {type(e).__name__}: {e}") from e


def shutdown() -> None:
    """Leaves the job (every process, at the end; also done at exit)."""
    if is_initialized():
        jax.distributed.shutdown()


def process_index() -> int:
    return jax.process_index()


def num_processes() -> int:
    return jax.process_count()


def is_leader() -> bool:
    """Whether this is process 0, the one that writes the job's results (every process has
    them)."""
    return jax.process_index() == 0


def global_mesh(tensor_parallel: int | None = None):
    """The `[1, T]` mesh over the first T devices of all processes, process by process
    (default: every device), for `Engine(..., tensor_parallel=T, mesh=...)`. Every process
    must hold a device of it: each one runs every step."""
    from batchjax.sharding.mesh import make_mesh

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    t = len(devices) if tensor_parallel is None else tensor_parallel
    mesh = make_mesh(t, 1, devices)
    holders = {d.process_index for d in mesh.devices.flat}
    idle = sorted(set(range(jax.process_count())) - holders)
    if idle:
        raise MultihostError(
            f"tensor_parallel={t} over {len(devices)} devices of {jax.process_count()} "
            f"processes leaves process(es) {idle} without a device of the mesh; use a multiple "
            f"of the {len(jax.local_devices())} device(s) per process")
    return mesh


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_leader(value: Any) -> Any:
    """Process 0's `value` (JSON-serializable) on every process: for what only the leader
    knows, such as the ids a resumed job already finished in its output file."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_leader() else None
    size = int(multihost_utils.broadcast_one_to_all(
        np.int32(blob.size if blob is not None else 0)))
    data = np.asarray(multihost_utils.broadcast_one_to_all(
        blob if blob is not None else np.zeros(size, np.uint8)))
    return json.loads(data.astype(np.uint8).tobytes().decode())


def fingerprint(value: Any) -> str:
    """A digest of `value` (JSON-like: requests as dicts or strings, or objects with
    `__dict__`): equal on every process exactly when the inputs are."""
    blob = json.dumps(value, sort_keys=True, default=lambda o: getattr(o, "__dict__", repr(o)))
    return hashlib.sha256(blob.encode()).hexdigest()


def check_same_inputs(value: Any, what: str = "requests") -> None:
    """Raises on every process unless every process passed the same `value`. The processes of
    a job must run the same steps; different requests on one would hang the job or mix
    results."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(fingerprint(value)), np.uint32).copy()
    everyone = np.asarray(multihost_utils.process_allgather(digest))
    differ = [p for p in range(everyone.shape[0]) if not np.array_equal(everyone[p], digest)]
    if differ:
        raise MultihostError(
            f"the {what} differ between processes: process {jax.process_index()} disagrees "
            f"with process(es) {differ}; every process must be given the same {what}")
