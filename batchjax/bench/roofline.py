"""The machine's matmul roofline, measured in the run that reports utilisation against it."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(size: int, repeats: int, dtype=jnp.float32) -> float:
    """Sustained GFLOP/s of a [size, size] @ [size, size] product on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    product = jax.jit(jnp.dot)
    return 2 * size**3 / median_seconds(lambda: product(a, b), repeats) / 1e9
