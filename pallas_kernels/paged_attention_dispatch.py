"""Picks the TPU or a GPU variant of the paged attention kernel; all share one contract."""

from typing import Literal

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import paged_attention_mgpu as mgpu
from pallas_kernels.paged_attention_gpu import paged_attention_gpu
from pallas_kernels.paged_attention_tpu import paged_attention_tpu

# "gpu": Mosaic GPU where the shape allows it (16-bit operands, D a multiple of 64, pages of 8
# to 128 tokens), else the Triton variant. "mosaic_gpu" and "triton" ask for one variant.
Backend = Literal["tpu", "gpu", "mosaic_gpu", "triton"]
Interpret = bool | pltpu.InterpretParams


def _use_mosaic_gpu(q: jax.Array, k_pages: jax.Array, interpret: Interpret) -> bool:
    if interpret and not mgpu.has_interpreter():
        return False
    try:
        mgpu.check_supported(q.dtype, q.shape[-1], k_pages.shape[1],
                             q.shape[1] // k_pages.shape[2])
    except ValueError:
        return False
    return True


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    kv_lens: jax.Array,
    q_starts: jax.Array,
    q_lens: jax.Array,
    *,
    causal: bool,
    interpret: Interpret,
    block_q: int,
    pages_per_block: int | None,
    backend: Backend | None,
) -> tuple[jax.Array, jax.Array]:
    """`backend=None` follows the default device; in the interpreter on CPU it means "tpu",
    whose interpreter also checks DMA races. `pages_per_block` applies to the TPU variant."""
    if backend is None:
        platform = jax.default_backend()
        if platform == "cpu" and not interpret:
            raise ValueError("Pallas kernels need a GPU or TPU here; pass interpret=True")
        backend = "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
    metadata = (page_tables, kv_lens, q_starts, q_lens)
    if backend == "gpu":
        backend = "mosaic_gpu" if _use_mosaic_gpu(q, k_pages, interpret) else "triton"
    if backend in ("mosaic_gpu", "triton") and isinstance(interpret, pltpu.InterpretParams):
        raise ValueError("InterpretParams is the TPU interpreter; use interpret=True on a GPU "
                         "variant")
    if backend == "mosaic_gpu":
        return mgpu.paged_attention_mgpu(
            q, k_pages, v_pages, *metadata, causal=causal, block_q=block_q,
            interpret=bool(interpret),
        )
    if backend == "triton":
        return paged_attention_gpu(
            q, k_pages, v_pages, *metadata, causal=causal, block_q=block_q, interpret=interpret
        )
    return paged_attention_tpu(
        q, k_pages, v_pages, *metadata, causal=causal, block_q=block_q,
        pages_per_block=pages_per_block, interpret=interpret,
    )
