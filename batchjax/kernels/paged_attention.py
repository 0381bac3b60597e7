"""Ragged paged attention, natively on x86-64 CPUs (`paged_attention.cc`).

The same contract as `batchjax.attention.xla.ragged_paged_attention`, which is its reference:
sequence s owns the step's query rows `q_start[s] : q_start[s] + q_len[s]` and the first
`kv_len[s]` keys of its page table; causal, its query i sees the keys up to index
`kv_len - q_len + i`, otherwise all of them. XLA's version reads each query token's keys on
its own; the kernel reads each page once for up to 64 queries of a sequence, where it lies.
Building and availability: `native`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from batchjax.kernels import native

_TARGETS = {jnp.dtype(jnp.float32): "batchjax_ragged_paged_attention_f32",
            jnp.dtype(jnp.uint16): "batchjax_ragged_paged_attention_bf16"}
MAX_PAGE_SIZE = 256


# Head sizes the kernel takes are multiples of these, by pool dtype: f32 pools are read 8
# values at a time; bf16 ones (bf16, or the uint16 bit patterns `batchjax.engine.page_pool`
# keeps them as) 16 at a time. Other pools it does not read.
_HEAD_MULTIPLE = {jnp.dtype(jnp.float32): 8, jnp.dtype(jnp.bfloat16): 16,
                  jnp.dtype(jnp.uint16): 16}


def supports(q: jax.Array, k_pages: jax.Array) -> bool:
    """Whether the kernel takes these operands (f32 or bf16 queries; f32 or bf16 pools, the
    head size a multiple of 8 or 16; GQA)."""
    hq, d = q.shape[-2:]
    page_size, hkv, dk = k_pages.shape[-3:]
    multiple = _HEAD_MULTIPLE.get(jnp.dtype(k_pages.dtype))
    return (q.dtype in (jnp.float32, jnp.bfloat16) and multiple is not None
            and d % multiple == 0 and dk == d and hq % hkv == 0
            and page_size <= MAX_PAGE_SIZE)


def ragged_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_len: jax.Array, q_start: jax.Array, q_len: jax.Array, *, causal: bool, layer=None,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D] f32 or bf16; pools [L, N, page, Hkv, D] (f32, bf16 or bf16 bits as
    uint16) with `layer`, else [N, page, Hkv, D]; page_table: [S, P]; kv_len, q_start, q_len:
    [S] -> out [T, Hq, D] f32, lse [T, Hq] f32 (rows no sequence owns: 0 and -1e30). The
    arithmetic is f32 whatever the pools hold."""
    native.require()
    if not supports(q, k_pages):
        raise ValueError(f"unsupported operands q{q.shape} {q.dtype}, "
                         f"pools{k_pages.shape} {k_pages.dtype}")
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    if k_pages.dtype == jnp.bfloat16:
        k_pages = jax.lax.bitcast_convert_type(k_pages, jnp.uint16)
        v_pages = jax.lax.bitcast_convert_type(v_pages, jnp.uint16)
    tokens, hq, d = q.shape
    out = (jax.ShapeDtypeStruct((tokens, hq, d), jnp.float32),
           jax.ShapeDtypeStruct((tokens, hq), jnp.float32))
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return jax.ffi.ffi_call(_TARGETS[k_pages.dtype], out)(
        q.astype(jnp.float32), k_pages, v_pages, i32(page_table), i32(kv_len), i32(q_start),
        i32(q_len), i32(layer).reshape(()), i32(1 if causal else 0).reshape(()))
