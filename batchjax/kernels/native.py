"""Builds, loads and registers the native CPU kernels (`*.cc` here) with XLA's FFI.

XLA's CPU code runs the engine's decode-sized work well below what the cores can do: dense
products (`packed_matmul.cc`; bf16 ones on AVX512-BF16 or AMX where the CPU has them,
`packed_matmul_bf16dp.cc`) and ragged paged attention (`paged_attention.cc`). The kernels are C++ with AVX2/FMA intrinsics, compiled on first
use with the system's C++ compiler against the FFI headers that ship with jaxlib, cached under
`~/.cache/batchjax/native` (or `$BATCHJAX_CACHE_DIR/native`) by a hash of sources, flags and
jaxlib version, and registered as XLA custom calls. Where that is not possible (no compiler, a
CPU without AVX2/FMA, not x86-64) `unavailable_reason()` says why and the engine keeps XLA's own
code. `BATCHJAX_NATIVE_KERNELS=0` turns them off.
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

_SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cc")))
_HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
_FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> exported handler symbol.
TARGETS = {
    "batchjax_packed_matmul_f32": "BatchjaxPackedMatmulF32",
    "batchjax_packed_matmul_bf16": "BatchjaxPackedMatmulBF16",
    "batchjax_ragged_paged_attention_f32": "BatchjaxRaggedPagedAttentionF32",
    "batchjax_ragged_paged_attention_bf16": "BatchjaxRaggedPagedAttentionBF16",
    "batchjax_packed_matmul_bf16_pairs": "BatchjaxPackedMatmulBF16Pairs",
}
_log = logging.getLogger(__name__)


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags (Linux on x86-64), empty where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split())


def cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_features()


def cpu_has_avx512_bf16() -> bool:
    """Whether bf16 products can run on VDPBF16PS (`packed_matmul_bf16dp.cc`);
    `BATCHJAX_CPU_BF16=widen` keeps them on the AVX2 path that widens bf16 to f32."""
    if os.environ.get("BATCHJAX_CPU_BF16", "") == "widen":
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_features()


def cpu_has_amx_bf16() -> bool:
    """Whether those products run on AMX tiles instead (`BATCHJAX_CPU_BF16=avx512` keeps them
    on VDPBF16PS); the kernel also needs Linux to grant the process AMX state, and falls back
    to VDPBF16PS where it does not."""
    if os.environ.get("BATCHJAX_CPU_BF16", "") == "avx512":
        return False
    return cpu_has_avx512_bf16() and {"amx_bf16", "amx_tile"} <= cpu_features()


def _cache_dir() -> Path:
    root = os.environ.get("BATCHJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "batchjax")
    return Path(root) / "native"


def _build() -> Path:
    """Compiles the kernels into the cache (once per sources, flags and jaxlib) and returns it."""
    import jaxlib

    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256()
    for source in _SOURCES + _HEADERS:
        key.update(source.name.encode())
        key.update(source.read_bytes())
    for part in (" ".join(_FLAGS), compiler, jaxlib.__version__):
        key.update(part.encode())
    out = _cache_dir() / f"batchjax_native-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, "-w", f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES),
               "-o", tmp]
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
    """Registers the kernels with XLA; returns None on success, else why they are unavailable."""
    if os.environ.get("BATCHJAX_NATIVE_KERNELS", "1") == "0":
        return "turned off by BATCHJAX_NATIVE_KERNELS=0"
    if not cpu_has_avx2_fma():
        return "this CPU is not x86-64 with AVX2 and FMA"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        _log.warning("native CPU kernels unavailable, using XLA's: %s", e)
        return str(e)
    return None


def unavailable_reason() -> str | None:
    """None when the native kernels can run here, else a one-line reason."""
    return _load()


def require() -> None:
    """Registers the kernels (first call) or raises with the reason they cannot run."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the native CPU kernels cannot run here: {reason}")
