"""The device side of the KV cache: one page pool per layer for K and for V.

Page ids, refcounts and budgets live on the host, in the policy's batcher
(`batchjax.schedule.pages`); this module only sizes and allocates the arrays.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from batchjax.models.config import ModelConfig


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype,
                      kv_heads: int | None = None) -> int:
    """K and V of one page across all layers (`kv_heads`: the pool's heads, over all the
    devices of a replica, where tensor parallelism replicates KV heads)."""
    itemsize = np.dtype(dtype).itemsize
    kv_heads = config.num_kv_heads if kv_heads is None else kv_heads
    return 2 * config.num_layers * page_size * kv_heads * config.head_dim * itemsize


def free_memory_bytes(device) -> int | None:
    """Bytes `device` can still allocate: an accelerator's limit less what is in use, the
    host's available memory for a CPU device; None where neither is known."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_kv_fits(num_pages: int, bytes_per_page: int, devices, kv_budget_mb: float) -> None:
    """Raises ValueError, with the sizes, when `num_pages` (spread evenly over `devices`, all
    of one host's memory for CPU devices) do not fit in the memory left."""
    devices = list(devices)
    need = (num_pages + 1) * bytes_per_page  # the null page too
    if all(d.platform == "cpu" for d in devices):
        groups = [(devices[0], need)]  # CPU devices share the host's memory
    else:
        groups = [(d, need // len(devices)) for d in devices]
    for device, bytes_needed in groups:
        free = free_memory_bytes(device)
        if free is not None and bytes_needed > free:
            raise ValueError(
                f"kv_budget_mb={kv_budget_mb:g} needs {bytes_needed / 2**30:.2f} GiB of KV on "
                f"{device}, more than the {max(free, 0) / 2**30:.2f} GiB it has free; lower "
                f"kv_budget_mb")


def pages_for_budget(config: ModelConfig, page_size: int, dtype, kv_budget_mb: float,
                     kv_heads: int | None = None) -> int:
    """Pages a replica's `kv_budget_mb` (over all its devices) holds."""
    return int(kv_budget_mb * 2**20 // kv_bytes_per_page(config, page_size, dtype, kv_heads))


def kv_storage_dtype(dtype):
    """The dtype a pool of `dtype` keys and values is stored in: 16-bit floats as their bits.

    XLA's CPU backend has no bf16 scatter: it upcasts the scatter's whole operand, every
    layer's pool, to f32 and back once per layer (a 64-row bf16 decode step took 15 s). A
    uint16 pool is scattered as is; the attention reads pages back as the model's dtype
    (`batchjax.attention.xla.pages_as`).
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
        return jnp.dtype(jnp.uint16)
    return dtype


def allocate_kv(config: ModelConfig, kv_budget_pages: int, page_size: int, dtype,
                kv_heads: int | None = None, sharding=None) -> tuple:
    """`(k, v)` pools for all layers, each `[L, kv_budget_pages + 1, page_size, Hkv, D]`, of
    `kv_storage_dtype(dtype)`, laid out on `sharding` (heads over the mesh's `model` axis)
    where one is given.

    The extra page is the null page (id 0) that padding tokens write to.
    """
    kv_heads = config.num_kv_heads if kv_heads is None else kv_heads
    shape = (config.num_layers, kv_budget_pages + 1, page_size, kv_heads, config.head_dim)
    storage = kv_storage_dtype(dtype)
    if sharding is None:
        return jnp.zeros(shape, storage), jnp.zeros(shape, storage)
    zeros = jax.jit(lambda: jnp.zeros(shape, storage), out_shardings=sharding)
    return zeros(), zeros()
