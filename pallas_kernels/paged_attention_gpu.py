"""Paged flash attention for GPU: the GPU variant of `paged_attention_tpu`, same contract.

Written with backend-neutral Pallas only (ref indexing, `jnp.dot`, `lax.fori_loop`, state in
loop carries), so it runs in the CPU interpreter and lowers through Pallas's Triton pipeline
(deprecated upstream in favour of Mosaic GPU, which this kernel does not target yet).
Differences from the TPU variant, each forced by the GPU programming model:

* no scalar prefetch: the work lists are ordinary int32 operands read with scalar loads;
* no DMA engine to drive by hand: a key page is a strided gather `k[page, :, h, :]`, and the
  grid runs over (query block, kv head) so each program holds one head's state in registers;
* block shapes must be powers of two: `block_q * Hq/Hkv`, `page_size` and `D`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_metadata import block_work
from pallas_kernels.reference import NO_KEYS_LSE


def _kernel(
    block_first_ref,  # [num_blocks] int32, see paged_metadata.BlockWork
    block_end_ref,
    tables_ref,  # [S * P]
    kv_lens_ref,  # [S]
    q_starts_ref,
    q_lens_ref,
    q_ref,  # [block_q * group, D], kv head program_id(1)
    k_ref,  # [num_pages, page_size, Hkv, D] whole, in GPU memory
    v_ref,
    out_ref,  # [block_q * group, D]
    lse_ref,  # [block_q * group] float32
    *,
    causal: bool,
    page_size: int,
    pages_per_seq: int,
    block_q: int,
    group: int,
    scale: float,
):
    rows = block_q * group
    block = pl.program_id(0)
    head = pl.program_id(1)
    block_start = block * block_q
    queries = q_ref[...]
    # Non-negative operands throughout: lax.div is exact and avoids floor-division fix-ups.
    row_token = block_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, page_size), 0), group)
    key_in_page = lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)

    def attend_sequence(seq, state):
        kv_len = kv_lens_ref[seq]
        q_start = q_starts_ref[seq]
        q_len = q_lens_ref[seq]
        if causal:
            last_row = jnp.minimum(q_start + q_len, block_start + block_q) - 1
            key_end = jnp.minimum(kv_len, kv_len - q_len + (last_row - q_start) + 1)
        else:
            key_end = kv_len
        owned = (row_token >= q_start) & (row_token < q_start + q_len)

        def attend_page(page_idx, state):
            m_prev, l_prev, acc = state
            page = tables_ref[seq * pages_per_seq + page_idx]
            keys = k_ref[page, :, head, :]  # [page_size, D]
            values = v_ref[page, :, head, :]
            key_pos = page_idx * page_size + key_in_page
            mask = owned & (key_pos < kv_len)
            if causal:
                mask = mask & (key_pos <= kv_len - q_len + row_token - q_start)
            scores = jnp.dot(queries, keys.T, preferred_element_type=jnp.float32)
            scores = jnp.where(mask, scores * scale, NO_KEYS_LSE)
            m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1))
            probs = jnp.where(mask, jnp.exp(scores - m_new[:, None]), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_new = alpha * l_prev + jnp.sum(probs, axis=1)
            acc = alpha[:, None] * acc + jnp.dot(
                probs.astype(values.dtype), values, preferred_element_type=jnp.float32
            )
            return m_new, l_new, acc

        num_pages = lax.div(key_end + page_size - 1, page_size)
        return lax.fori_loop(0, num_pages, attend_page, state)

    init = (
        jnp.full((rows,), NO_KEYS_LSE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, q_ref.shape[-1]), jnp.float32),
    )
    m, denom, acc = lax.fori_loop(
        block_first_ref[block], block_end_ref[block], attend_sequence, init
    )
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out_ref[...] = (acc / safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), NO_KEYS_LSE)


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "interpret"))
def paged_attention_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    kv_lens: jax.Array,
    q_starts: jax.Array,
    q_lens: jax.Array,
    *,
    causal: bool,
    block_q: int = 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D]; k_pages, v_pages: [N, page_size, Hkv, D]; page_tables: [S, P];
    kv_lens, q_starts, q_lens: [S]. Returns out: [T, Hq, D] and lse: [T, Hq] float32.
    """
    num_tokens, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = q_heads // kv_heads
    num_blocks = -(-num_tokens // block_q)
    padded_tokens = num_blocks * block_q
    rows = block_q * group
    work = block_work(num_blocks, block_q, num_pages, page_tables, kv_lens, q_starts, q_lens)

    # q: [T, Hq, D] -> [Hkv, T_pad * group, D]; row (t, r) is token t, query head kv*group + r.
    q_rows = q.reshape(num_tokens, kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(kv_heads, padded_tokens * group, head_dim)

    kernel = functools.partial(
        _kernel,
        causal=causal,
        page_size=page_size,
        pages_per_seq=page_tables.shape[1],
        block_q=block_q,
        group=group,
        scale=1.0 / math.sqrt(head_dim),
    )
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out_rows, lse_rows = pl.pallas_call(
        kernel,
        grid=(num_blocks, kv_heads),
        in_specs=[whole] * len(work)
        + [pl.BlockSpec((None, rows, head_dim), lambda i, h: (h, i, 0)), whole, whole],
        out_specs=[
            pl.BlockSpec((None, rows, head_dim), lambda i, h: (h, i, 0)),
            pl.BlockSpec((None, rows), lambda i, h: (h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((kv_heads, padded_tokens * group, head_dim), q.dtype),
            jax.ShapeDtypeStruct((kv_heads, padded_tokens * group), jnp.float32),
        ],
        # Triton lowering: the Mosaic GPU lowering needs explicit register layouts and shared
        # memory staging for this kernel's gathers, which it does not have yet.
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_attention_causal" if causal else "paged_attention_prefix",
    )(*work, q_rows, k_pages, v_pages)

    out = out_rows.reshape(kv_heads, padded_tokens, group, head_dim)[:, :num_tokens]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, q_heads, head_dim)
    lse = lse_rows.reshape(kv_heads, padded_tokens, group)[:, :num_tokens]
    return out, lse.transpose(1, 0, 2).reshape(num_tokens, q_heads)
