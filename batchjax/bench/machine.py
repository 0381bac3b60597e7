"""Where and when a benchmark ran: CPU, cores, memory, load, library versions, date."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
from typing import Any

_PACKAGES = ("batchjax", "jax", "jaxlib", "flax", "numpy")


# The vector extensions that set a CPU's matmul rate: machines sold under one model name
# ("AMD EPYC") differ by more than 2x in it, and the name alone does not tell them apart.
_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none), read once."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_details() -> dict[str, Any]:
    """Family and model numbers, and which of `_SIMD_FLAGS` the CPU has."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"family": info.get("cpu family"), "model": info.get("model"),
            "simd": [f for f in _SIMD_FLAGS if f in flags]}


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load: other work on the cores shows up in every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_details": cpu_details(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": load_average(),
        "versions": versions,
    }
