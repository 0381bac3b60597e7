"""The device mesh: axes `("data", "model")`; each row of it is one data-parallel replica.

One device is a mesh of one (`make_mesh()`), run through the same code as any other mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")


class MeshError(ValueError):
    """The devices given cannot form the mesh asked for."""


def make_mesh(tensor_parallel: int = 1, data_parallel: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `[data_parallel, tensor_parallel]` mesh over the first T x D of `devices` (default:
    this process's devices, or every process's under `jax.distributed`)."""
    for name, n in (("tensor_parallel", tensor_parallel), ("data_parallel", data_parallel)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise MeshError(f"{name} must be a positive integer, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel * data_parallel
    if need > len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX "
                "is imported to get N host devices)" if platform == "cpu" else "")
        raise MeshError(
            f"tensor_parallel={tensor_parallel} x data_parallel={data_parallel} needs {need} "
            f"devices; {len(devices)} {platform} device(s) are available{hint}")
    grid = np.empty((data_parallel, tensor_parallel), dtype=object)
    for i, d in enumerate(devices[:need]):
        grid[i // tensor_parallel, i % tensor_parallel] = d
    return Mesh(grid, AXES)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One `[1, T]` sub-mesh per data-parallel replica (a row of `mesh`)."""
    return [Mesh(mesh.devices[r:r + 1], AXES) for r in range(mesh.devices.shape[0])]


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device of `mesh` holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def spans_processes(mesh: Mesh) -> bool:
    """Whether some device of `mesh` belongs to another process (a `jax.distributed` job)."""
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def reading_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """How a checkpoint tensor is read onto `mesh` when its devices span processes: split
    over every device along the first axis that divides evenly (each process then reads its
    own part of the file), whole on each device if none does (small ones: norms, biases)."""
    n = mesh.devices.size
    spec = [None] * len(shape)
    for axis, size in enumerate(shape):
        if size % n == 0:
            spec[axis] = AXES
            break
    return NamedSharding(mesh, PartitionSpec(*spec))


def describe(mesh: Mesh) -> str:
    d, t = mesh.devices.shape
    return f"{d} x {t} mesh ({AXES[0]} x {AXES[1]}) of {mesh.devices.flat[0].platform} devices"
