"""The device side of the KV cache: one page pool per layer for K and for V.

Page ids, refcounts and budgets live on the host, in the policy's batcher
(`batchjax.schedule.pages`); this module only sizes and allocates the arrays.
"""

from __future__ import annotations

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
