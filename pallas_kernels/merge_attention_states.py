"""Pallas kernel for the log-sum-exp merge of two partial attention results.

An elementwise kernel over blocks of rows; the same source serves TPU, GPU and the interpreter.
The arithmetic is `merge_attention_states_reference`'s, row block by row block.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.reference import merge_attention_states_reference


def _kernel(out1_ref, lse1_ref, out2_ref, lse2_ref, out_ref, lse_ref):
    # out*: [block_t, Hq, D]; lse*: [block_t, Hq] float32.
    out, lse = merge_attention_states_reference(
        out1_ref[...], lse1_ref[...], out2_ref[...], lse2_ref[...]
    )
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def merge_attention_states(
    out1: jax.Array,
    lse1: jax.Array,
    out2: jax.Array,
    lse2: jax.Array,
    *,
    block_t: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """out1, out2: [T, Hq, D]; lse1, lse2: [T, Hq]. Returns (out: [T, Hq, D], lse: [T, Hq] f32).

    A side whose lse is the no-keys sentinel weighs 0; a row with no keys on either side gives
    out 0 and the sentinel lse. `block_t` must be a multiple of 8 on TPU; by default 8 there and
    1 on a GPU, where a program holds its whole block in registers.
    """
    if block_t is None:
        block_t = 1 if jax.default_backend() in ("gpu", "cuda", "rocm") and not interpret else 8
    num_tokens, q_heads, head_dim = out1.shape
    padded = -(-num_tokens // block_t) * block_t
    pad = padded - num_tokens
    row_pad3 = ((0, pad), (0, 0), (0, 0))
    row_pad2 = ((0, pad), (0, 0))
    operands = (
        jnp.pad(out1, row_pad3),
        jnp.pad(lse1.astype(jnp.float32), row_pad2),
        jnp.pad(out2, row_pad3),
        jnp.pad(lse2.astype(jnp.float32), row_pad2),
    )
    out_spec = pl.BlockSpec((block_t, q_heads, head_dim), lambda i: (i, 0, 0))
    lse_spec = pl.BlockSpec((block_t, q_heads), lambda i: (i, 0))
    out, lse = pl.pallas_call(
        _kernel,
        grid=(padded // block_t,),
        in_specs=[out_spec, lse_spec, out_spec, lse_spec],
        out_specs=[out_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct((padded, q_heads, head_dim), out1.dtype),
            jax.ShapeDtypeStruct((padded, q_heads), jnp.float32),
        ],
        interpret=interpret,
        name="merge_attention_states",
    )(*operands)
    return out[:num_tokens], lse[:num_tokens]
