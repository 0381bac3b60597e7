"""`x @ W[layer]` on x86-64 CPUs through a native kernel, for the engine's dense layers.

XLA's CPU dot runs the products of a decode step (a few to a few dozen rows against a layer's
weights) at a third to a half of what the cores can do. `packed_matmul.cc` is a register-blocked
AVX2/FMA kernel over weights packed once in 16-column panels; the stacked weights of all layers
are one operand and the layer index another, so a `lax.scan` over layers passes them by
reference instead of copying each layer's slice. Building and availability: `native`.

bf16 weights stay bf16 in memory (half the bytes a decode step streams), stored as uint16
bit patterns in one of two layouts, chosen by what the CPU can do:
- "pairs" (CPUs with AVX512-BF16, `packed_matmul_bf16dp.cc`): a panel's rows in pairs, each
  pair column by column, `[..., N/16, K/2, 32]`, the operand of VDPBF16PS, which multiplies
  bf16 pairs into f32 sums (the rows of x are bf16 values in a bf16 model, so rounding them to
  bf16 changes nothing);
- "widen" (AVX2 and FMA only): `[..., N/16, K, 16]`, each 16-column row interleaved (columns
  0, 8, 1, 9, ...) so the kernel widens it into two 8-lane f32 halves without a shuffle.
Either way the sums are f32, as XLA's CPU dot does them, and the product is rounded to bf16 as
XLA's would be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from batchjax.kernels import native

PANEL = 16  # output columns per packed panel; the kernel's register tile
_TARGETS = {jnp.dtype(jnp.float32): "batchjax_packed_matmul_f32",
            jnp.dtype(jnp.uint16): "batchjax_packed_matmul_bf16"}
_PAIRS_TARGET = "batchjax_packed_matmul_bf16_pairs"
LAYOUTS = ("pairs", "widen")


def bf16_layout() -> str:
    """The bf16 panel layout of this CPU's fastest path (see the module docstring)."""
    return "pairs" if native.cpu_has_avx512_bf16() else "widen"
# A bf16 panel row in memory: columns 0, 8, 1, 9, ..., 7, 15 (and back).
_INTERLEAVE = np.stack([np.arange(8), np.arange(8, 16)], axis=1).reshape(-1)
_DEINTERLEAVE = np.argsort(_INTERLEAVE)


def pack(w: jax.Array | np.ndarray, bf16_layout: str = "widen") -> jax.Array:
    """[..., K, N] weights -> panels (N must be a multiple of 16): f32 as they are,
    [..., N/16, K, 16]; bf16 as uint16 bit patterns in `bf16_layout` ("pairs" needs an even
    K and gives [..., N/16, K/2, 32])."""
    *lead, k, n = w.shape
    if n % PANEL:
        raise ValueError(f"packed weights need N divisible by {PANEL}, got N={n}")
    if bf16_layout not in LAYOUTS:
        raise ValueError(f"bf16_layout must be one of {LAYOUTS}, got {bf16_layout!r}")
    w = jnp.asarray(w)
    if w.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"packed weights are f32 or bf16, got {w.dtype}")
    w = jnp.moveaxis(w.reshape(*lead, k, n // PANEL, PANEL), -2, -3)  # [..., P, K, 16]
    if w.dtype == jnp.bfloat16 and bf16_layout == "pairs":
        if k % 2:
            raise ValueError(f"the pairs layout needs an even K, got K={k}")
        w = w.reshape(*w.shape[:-2], k // 2, 2, PANEL)
        w = jnp.swapaxes(w, -1, -2).reshape(*w.shape[:-3], k // 2, 2 * PANEL)
        w = jax.lax.bitcast_convert_type(w, jnp.uint16)
    elif w.dtype == jnp.bfloat16:
        w = jax.lax.bitcast_convert_type(w[..., _INTERLEAVE], jnp.uint16)
    return w


def unpack(wp: jax.Array) -> jax.Array:
    """Inverse of `pack`: panels -> [..., K, 16P] (bf16 for uint16 panels)."""
    *lead, p, k, c = wp.shape
    if wp.dtype == jnp.uint16:
        wp = jax.lax.bitcast_convert_type(jnp.asarray(wp), jnp.bfloat16)
        if c == 2 * PANEL:  # pairs: [.., K/2, 16, 2] -> [.., K, 16]
            wp = jnp.swapaxes(wp.reshape(*lead, p, k, PANEL, 2), -1, -2)
            wp = wp.reshape(*lead, p, 2 * k, PANEL)
            k = 2 * k
        else:
            wp = wp[..., _DEINTERLEAVE]
    return jnp.moveaxis(wp, -3, -2).reshape(*lead, k, p * PANEL)


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
    pairs = wp.dtype == jnp.uint16 and wp.shape[-1] == 2 * PANEL
    k_rows = 2 * wp.shape[2] if pairs else wp.shape[2]
    if x.ndim != 2 or wp.ndim != 4 or wp.shape[-1] not in (PANEL, 2 * PANEL) or (
            k_rows != x.shape[1]):
        raise ValueError(f"want x[M, K] and wp[L, N/16, K, 16] (or [L, N/16, K/2, 32] bf16 "
                         f"pairs), got {x.shape} and {wp.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], wp.shape[1] * PANEL), jnp.float32)
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    rows = jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32).reshape(())
    target = _PAIRS_TARGET if pairs else _TARGETS[wp.dtype]
    y = jax.ffi.ffi_call(target, out)(x.astype(jnp.float32), wp, layer, rows)
    return y.astype(x.dtype)
