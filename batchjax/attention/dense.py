"""Dense causal attention without a cache: the oracle path for model parity tests.

Every token of a flat batch attends to the tokens of its own segment at the same or an earlier
position. Nothing is stored, so `layer_kv` passes through untouched (it is `None` here).
"""

import math

import jax
import jax.numpy as jnp

from batchjax.attention import AttentionFn

# Finite, so a row with nothing to attend to gives a uniform softmax instead of NaN.
_MASKED_SCORE = -1e30


def dense_causal_attention(segment_ids: jax.Array, positions: jax.Array) -> AttentionFn:
    """segment_ids, positions: [T] int32 -> an `AttentionFn` over the whole flat batch."""
    # allowed: [Tq, Tk]
    allowed = (segment_ids[:, None] == segment_ids[None, :]) & (
        positions[None, :] <= positions[:, None]
    )

    def attend(layer_idx: int, q: jax.Array, k: jax.Array, v: jax.Array, layer_kv):
        del layer_idx
        # q: [T, Hq, D]; k, v: [T, Hkv, D]; query heads grouped over their shared kv head.
        t, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        qg = q.reshape(t, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = jnp.einsum("qhgd,khd->hgqk", qg, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed, scores / math.sqrt(head_dim), _MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [Hkv, G, Tq, Tk]
        out = jnp.einsum("hgqk,khd->qhgd", probs, v)
        return out.reshape(t, num_heads, head_dim), layer_kv

    return attend
