"""`x @ W[layer]` on x86-64 CPUs through a native kernel, for the engine's dense layers.

XLA's CPU dot runs the products of a decode step (a few to a few dozen rows against a layer's
weights) at a third to a half of what the cores can do. `packed_matmul.cc` is a register-blocked
AVX2/FMA kernel over weights packed once in 16-column panels; the stacked weights of all layers
are one operand and the layer index another, so a `lax.scan` over layers passes them by
reference instead of copying each layer's slice. Building and availability: `native`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from batchjax.kernels import native

PANEL = 16  # output columns per packed panel; the kernel's register tile
_TARGET = "batchjax_packed_matmul_f32"


def pack(w: jax.Array | np.ndarray) -> jax.Array:
    """[..., K, N] weights -> [..., N/16, K, 16] panels (N must be a multiple of 16)."""
    *lead, k, n = w.shape
    if n % PANEL:
        raise ValueError(f"packed weights need N divisible by {PANEL}, got N={n}")
    w = jnp.asarray(w).reshape(*lead, k, n // PANEL, PANEL)
    return jnp.moveaxis(w, -2, -3)


def unpack(wp: jax.Array) -> jax.Array:
    """Inverse of `pack`: [..., P, K, 16] -> [..., K, 16P]."""
    *lead, p, k, c = wp.shape
    return jnp.moveaxis(wp, -3, -2).reshape(*lead, k, p * c)


def packed_matmul_reference(x: jax.Array, wp: jax.Array, layer: jax.Array) -> jax.Array:
    """Plain jnp: x[M, K] @ unpack(wp[layer]) -> [M, N] f32."""
    return jnp.dot(x, unpack(wp[layer]), precision=jax.lax.Precision.HIGHEST)


def packed_matmul(x: jax.Array, wp: jax.Array, layer: jax.Array | int) -> jax.Array:
    """x[M, K] f32 @ layer `layer` of wp[L, N/16, K, 16] f32 -> [M, N] f32, natively.

    The engine picks this or XLA's dot once (`batchjax.engine.step.choose_cpu_kernels`).
    """
    native.require()  # registers the kernels with XLA on first use
    if x.dtype != jnp.float32 or wp.dtype != jnp.float32:
        raise TypeError(f"packed_matmul is f32 only, got {x.dtype} and {wp.dtype}")
    if x.ndim != 2 or wp.ndim != 4 or wp.shape[-1] != PANEL or wp.shape[2] != x.shape[1]:
        raise ValueError(f"want x[M, K] and wp[L, N/16, K, 16], got {x.shape} and {wp.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], wp.shape[1] * PANEL), jnp.float32)
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    return jax.ffi.ffi_call(_TARGET, out)(x, wp, layer)
