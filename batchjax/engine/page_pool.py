"""The device side of the KV cache: one page pool per layer for K and for V.

Page ids, refcounts and budgets live on the host, in the policy's batcher
(`batchjax.schedule.pages`); this module only sizes and allocates the arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from batchjax.models.config import ModelConfig


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
    """K and V of one page across all layers."""
    itemsize = np.dtype(dtype).itemsize
    return 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * itemsize


def pages_for_budget(config: ModelConfig, page_size: int, dtype, kv_budget_mb: float) -> int:
    return int(kv_budget_mb * 2**20 // kv_bytes_per_page(config, page_size, dtype))


def allocate_kv(config: ModelConfig, kv_budget_pages: int, page_size: int, dtype) -> tuple:
    """`(k, v)` pools for all layers, each `[L, kv_budget_pages + 1, page_size, Hkv, D]`.

    The extra page is the null page (id 0) that padding tokens write to.
    """
    shape = (config.num_layers, kv_budget_pages + 1, page_size, config.num_kv_heads,
             config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
