"""`x @ W[layer]` on x86-64 CPUs through a native kernel, for the engine's dense layers.

XLA's CPU dot runs the products of a decode step (a few to a few dozen rows against a layer's
weights) at a third to a half of what the cores can do. `packed_matmul.cc` is a register-blocked
AVX2/FMA kernel over weights packed once in 16-column panels; the stacked weights of all layers
are one operand and the layer index another, so a `lax.scan` over layers passes them by
reference instead of copying each layer's slice. Building and availability: `native`.

bf16 weights stay bf16 in memory (half the bytes a decode step streams) and are widened to f32
in registers: the arithmetic is f32, as XLA's CPU dot does it, and the product is rounded to
bf16 as XLA's would be. Their panels are stored as uint16 bit patterns, each 16-column row
interleaved (columns 0, 8, 1, 9, ...) so the kernel splits it into two 8-lane halves without a
shuffle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from batchjax.kernels import native

PANEL = 16  # output columns per packed panel; the kernel's register tile
_TARGETS = {jnp.dtype(jnp.float32): "batchjax_packed_matmul_f32",
            jnp.dtype(jnp.uint16): "batchjax_packed_matmul_bf16"}
# A bf16 panel row in memory: columns 0, 8, 1, 9, ..., 7, 15 (and back).
_INTERLEAVE = np.stack([np.arange(8), np.arange(8, 16)], axis=1).reshape(-1)
_DEINTERLEAVE = np.argsort(_INTERLEAVE)


def pack(w: jax.Array | np.ndarray) -> jax.Array:
    """[..., K, N] weights -> [..., N/16, K, 16] panels (N must be a multiple of 16): f32 as
    they are, bf16 as interleaved uint16 bit patterns."""
    *lead, k, n = w.shape
    if n % PANEL:
        raise ValueError(f"packed weights need N divisible by {PANEL}, got N={n}")
    w = jnp.asarray(w)
    if w.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"packed weights are f32 or bf16, got {w.dtype}")
    w = jnp.moveaxis(w.reshape(*lead, k, n // PANEL, PANEL), -2, -3)
    if w.dtype == jnp.bfloat16:
        w = jax.lax.bitcast_convert_type(w[..., _INTERLEAVE], jnp.uint16)
    return w


def unpack(wp: jax.Array) -> jax.Array:
    """Inverse of `pack`: [..., P, K, 16] -> [..., K, 16P] (bf16 for uint16 panels)."""
    *lead, p, k, c = wp.shape
    if wp.dtype == jnp.uint16:
        wp = jax.lax.bitcast_convert_type(jnp.asarray(wp), jnp.bfloat16)[..., _DEINTERLEAVE]
    return jnp.moveaxis(wp, -3, -2).reshape(*lead, k, p * c)


def packed_matmul_reference(x: jax.Array, wp: jax.Array, layer: jax.Array,
                            rows: jax.Array | int | None = None) -> jax.Array:
    """Plain jnp: x[M, K] @ unpack(wp[layer]) in f32 -> [M, N] in x's dtype; with `rows`,
    the rows from that index on are 0."""
    w = unpack(wp[layer]).astype(jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    if rows is not None:
        y = jnp.where(jnp.arange(x.shape[0])[:, None] < rows, y, 0.0)
    return y.astype(x.dtype)


def packed_matmul(x: jax.Array, wp: jax.Array, layer: jax.Array | int,
                  rows: jax.Array | int | None = None) -> jax.Array:
    """x[M, K] @ layer `layer` of wp[L, N/16, K, 16] -> [M, N] in x's dtype, natively.

    x is f32 or bf16; wp is f32 panels, or bf16 ones from `pack` (uint16). The product is
    computed in f32. Only x's first `rows` rows (a traced scalar; default all) are multiplied,
    the others give 0: a step's padding rows then cost nothing, and the compiled program does
    not depend on how many rows are real. The engine picks this or XLA's dot once
    (`batchjax.engine.step.choose_cpu_kernels`).
    """
    native.require()  # registers the kernels with XLA on first use
    if x.dtype not in (jnp.float32, jnp.bfloat16) or wp.dtype not in _TARGETS:
        raise TypeError(f"packed_matmul takes f32 or bf16 rows and f32 or packed bf16 "
                        f"(uint16) panels, got {x.dtype} and {wp.dtype}")
    if x.ndim != 2 or wp.ndim != 4 or wp.shape[-1] != PANEL or wp.shape[2] != x.shape[1]:
        raise ValueError(f"want x[M, K] and wp[L, N/16, K, 16], got {x.shape} and {wp.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], wp.shape[1] * PANEL), jnp.float32)
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    rows = jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32).reshape(())
    y = jax.ffi.ffi_call(_TARGETS[wp.dtype], out)(x.astype(jnp.float32), wp, layer, rows)
    return y.astype(x.dtype)
