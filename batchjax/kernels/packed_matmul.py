"""`x @ W[layer]` on x86-64 CPUs through a native kernel, for the engine's dense layers.

XLA's CPU dot runs the products of a decode step (a few to a few dozen rows against a layer's
weights) at a third to a half of what the cores can do. `packed_matmul.cc` is a register-blocked
AVX2/FMA kernel over weights packed once in 16-column panels; the stacked weights of all layers
are one operand and the layer index another, so a `lax.scan` over layers passes them by
reference instead of copying each layer's slice.

The kernel is compiled on first use with the system's C++ compiler against the FFI headers that
ship with jaxlib, cached under `~/.cache/batchjax` (or `$BATCHJAX_CACHE_DIR`), and registered with
XLA. Where that is not possible (no compiler, a CPU without AVX2/FMA, another platform)
`available()` says why and the engine keeps XLA's dot. `BATCHJAX_NATIVE_MATMUL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 16  # output columns per packed panel; the kernel's register tile
_SOURCE = Path(__file__).with_name("packed_matmul.cc")
_TARGET = "batchjax_packed_matmul_f32"
_FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
_log = logging.getLogger(__name__)


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in flags.splitlines() if ln.startswith("flags")), "")
    words = set(line.split())
    return {"avx2", "fma"} <= words


def _cache_dir() -> Path:
    root = os.environ.get("BATCHJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "batchjax")
    return Path(root) / "native"


def _build() -> Path:
    """Compiles the kernel into the cache (once per source, flags and jaxlib) and returns it."""
    import jaxlib

    include = jax.ffi.include_dir()
    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(),
                 jaxlib.__version__.encode()):
        key.update(part)
    out = _cache_dir() / f"packed_matmul-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, "-w", f"-I{include}", str(_SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _load() -> str | None:
    """Registers the kernel with XLA; returns None on success, else why it is unavailable."""
    if os.environ.get("BATCHJAX_NATIVE_MATMUL", "1") == "0":
        return "turned off by BATCHJAX_NATIVE_MATMUL=0"
    if not _cpu_has_avx2_fma():
        return "this CPU is not x86-64 with AVX2 and FMA"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(
            _TARGET, jax.ffi.pycapsule(lib.BatchjaxPackedMatmulF32), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _log.warning("native CPU matmul unavailable, using XLA's dot: %s", e)
        return str(e)
    return None


def unavailable_reason() -> str | None:
    """None when the native kernel can run here, else a one-line reason."""
    return _load()


def available() -> bool:
    return _load() is None


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

    The engine checks `available()` once and picks this or XLA's dot.
    """
    reason = _load()  # registers the kernel with XLA on first use
    if reason is not None:
        raise RuntimeError(f"the native matmul cannot run here: {reason}")
    if x.dtype != jnp.float32 or wp.dtype != jnp.float32:
        raise TypeError(f"packed_matmul is f32 only, got {x.dtype} and {wp.dtype}")
    if x.ndim != 2 or wp.ndim != 4 or wp.shape[-1] != PANEL or wp.shape[2] != x.shape[1]:
        raise ValueError(f"want x[M, K] and wp[L, N/16, K, 16], got {x.shape} and {wp.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], wp.shape[1] * PANEL), jnp.float32)
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    return jax.ffi.ffi_call(_TARGET, out)(x, wp, layer)
