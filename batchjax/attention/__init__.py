"""The attention interface between the model and whoever owns the KV cache.

The model computes q, k, v for a flat batch of T tokens (after RoPE and any q/k norm) and hands
them, per layer, to an `AttentionFn`; the function writes k and v where its cache wants them and
returns the attention output (softmax scale 1/sqrt(head_dim) applied inside):

    attention(layer: int, q: [T, Hq, D], k: [T, Hkv, D], v: [T, Hkv, D], layer_kv)
        -> (out: [T, Hq, D], layer_kv)

`layer_kv` is opaque to the model: `None` for the dense path used by parity tests, a pair of
page pools `(k_pages, v_pages)`, each `[num_pages, page_size, Hkv, D]`, for the engine. The
engine builds the metadata (page tables, group ids, lengths) and closes over it, so the model
never knows about pages or groups. Implementations: `xla` (plain jnp, the reference and the CPU
default) and `pallas` (pallas_kernels/).
"""

from typing import Any, Callable

import jax

AttentionFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
