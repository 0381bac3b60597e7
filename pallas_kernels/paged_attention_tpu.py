"""Paged flash attention for TPU (Mosaic): the one kernel behind both public attention kernels.

`causal=True` is the ragged paged attention of a flat step (each token against its own
sequence's pages); `causal=False` is the shared-prefix attention (each group's tokens against
the group's prefix pages, unmasked). Either way a "sequence" is (page table, number of keys,
first query row, number of query rows).

Layout. The grid runs over blocks of `block_q` query tokens. All kv heads are handled in one
grid step so each page is read from HBM once: a page `[page_size, Hkv, D]` is viewed as
`[page_size * Hkv, D]` (a free reshape) and copied by DMA; kv head h's keys are then the rows
`h, h + Hkv, ...`, one strided load. The query block is rearranged on the host side to
`[Hkv, block_q * Hq/Hkv, D]`, so the GQA query heads of one kv head form the rows of a single
matrix product against that head's keys: `[block_q * group, D] x [D, block_kv]`.

For a block the kernel walks the sequences that own some of its rows (see paged_metadata.py),
and for each sequence its key blocks of `pages_per_block` pages, double-buffered: the DMA of key
block j+1 is in flight while block j is computed. A sequence that straddles two query blocks
is read once per block, so the engine should start groups on a `block_q` boundary.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_metadata import block_work, default_pages_per_block
from pallas_kernels.reference import NO_KEYS_LSE

Interpret = bool | pltpu.InterpretParams


def _kernel(
    # Scalar prefetch (SMEM), see paged_metadata.BlockWork.
    block_first_ref,
    block_end_ref,
    tables_ref,
    kv_lens_ref,
    q_starts_ref,
    q_lens_ref,
    # Inputs.
    q_ref,  # [Hkv, block_q * group, D] VMEM
    k_hbm,  # [num_pages, page_size * Hkv, D] HBM
    v_hbm,
    # Outputs.
    out_ref,  # [Hkv, block_q * group, D]
    lse_ref,  # [Hkv, block_q * group, 1] float32
    # Scratch.
    k_buf,  # [2, pages_per_block * page_size * Hkv, D]
    v_buf,
    sems,  # DMA semaphores [2 (k, v), 2 (slot)]
    m_ref,  # [Hkv, block_q * group, 1] float32 running max
    l_ref,  # [Hkv, block_q * group, 1] float32 running denominator
    acc_ref,  # [Hkv, block_q * group, D] float32 running numerator
    *,
    causal: bool,
    page_size: int,
    pages_per_block: int,
    pages_per_seq: int,
    block_q: int,
    group: int,
    kv_heads: int,
    scale: float,
):
    # Integer division is lax.div / lax.rem: every operand is non-negative, and jnp's floor
    # division would add sign corrections that Mosaic lowers only when it knows the chip.
    rows = block_q * group
    block_kv = pages_per_block * page_size
    page_rows = page_size * kv_heads
    block_start = pl.program_id(0) * block_q

    m_ref[...] = jnp.full(m_ref.shape, NO_KEYS_LSE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def key_block_copies(seq, kv_len, kv_block, slot):
        # Pages past the last valid one re-read the last valid page: its keys are masked, and
        # unlike an unwritten buffer it holds no NaN that a zero weight could not cancel.
        last_page = lax.div(kv_len + page_size - 1, page_size) - 1
        copies = []
        for p in range(pages_per_block):
            page_idx = jnp.minimum(kv_block * pages_per_block + p, last_page)
            page = tables_ref[seq * pages_per_seq + page_idx]
            dst = pl.ds(p * page_rows, page_rows)
            for kind, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                copies.append(
                    pltpu.make_async_copy(hbm.at[page], buf.at[slot, dst], sems.at[kind, slot])
                )
        return copies

    def attend_sequence(seq, carry):
        kv_len = kv_lens_ref[seq]
        q_start = q_starts_ref[seq]
        q_len = q_lens_ref[seq]
        if causal:
            # Keys after the last query row of this sequence inside this block are never seen.
            last_row = jnp.minimum(q_start + q_len, block_start + block_q) - 1
            key_end = jnp.minimum(kv_len, kv_len - q_len + (last_row - q_start) + 1)
        else:
            key_end = kv_len
        num_kv_blocks = lax.div(key_end + block_kv - 1, block_kv)

        @pl.when(num_kv_blocks > 0)
        def _():
            for copy in key_block_copies(seq, kv_len, 0, 0):
                copy.start()

        row_in_block = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
        row_token = block_start + lax.div(row_in_block, group)
        owned = (row_token >= q_start) & (row_token < q_start + q_len)

        def attend_key_block(kv_block, carry):
            slot = lax.rem(kv_block, 2)

            @pl.when(kv_block + 1 < num_kv_blocks)
            def _():
                for copy in key_block_copies(seq, kv_len, kv_block + 1, 1 - slot):
                    copy.start()

            for copy in key_block_copies(seq, kv_len, kv_block, slot):
                copy.wait()

            key_pos = kv_block * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
            mask = owned & (key_pos < kv_len)
            if causal:
                mask = mask & (key_pos <= kv_len - q_len + row_token - q_start)

            for h in range(kv_heads):
                keys = k_buf[slot, pl.ds(h, block_kv, stride=kv_heads), :]  # [block_kv, D]
                values = v_buf[slot, pl.ds(h, block_kv, stride=kv_heads), :]
                scores = lax.dot_general(
                    q_ref[h], keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )  # [rows, block_kv]
                scores = jnp.where(mask, scores * scale, NO_KEYS_LSE)
                m_prev = m_ref[h]
                m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
                probs = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
                alpha = jnp.exp(m_prev - m_new)
                l_ref[h] = alpha * l_ref[h] + jnp.sum(probs, axis=1, keepdims=True)
                acc_ref[h] = alpha * acc_ref[h] + jnp.dot(
                    probs.astype(values.dtype), values, preferred_element_type=jnp.float32
                )
                m_ref[h] = m_new
            return carry

        return lax.fori_loop(0, num_kv_blocks, attend_key_block, carry)

    lax.fori_loop(block_first_ref[pl.program_id(0)], block_end_ref[pl.program_id(0)],
                  attend_sequence, 0)

    denom = l_ref[...]
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out_ref[...] = (acc_ref[...] / safe).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(safe), NO_KEYS_LSE)


@functools.partial(
    jax.jit, static_argnames=("causal", "block_q", "pages_per_block", "interpret")
)
def paged_attention_tpu(
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
    pages_per_block: int | None = None,
    interpret: Interpret = False,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D]; k_pages, v_pages: [N, page_size, Hkv, D]; page_tables: [S, P];
    kv_lens, q_starts, q_lens: [S]. Returns out: [T, Hq, D] and lse: [T, Hq] float32.

    On hardware `block_q * Hq/Hkv` should be a multiple of 8 (the sublane tile).
    """
    num_tokens, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = q_heads // kv_heads
    pages_per_seq = page_tables.shape[1]
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size, pages_per_seq)
    num_blocks = -(-num_tokens // block_q)
    padded_tokens = num_blocks * block_q
    rows = block_q * group
    work = block_work(num_blocks, block_q, num_pages, page_tables, kv_lens, q_starts, q_lens)

    # q: [T, Hq, D] -> [Hkv, T_pad * group, D]; row (t, r) is token t, query head kv*group + r.
    q_rows = q.reshape(num_tokens, kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(kv_heads, padded_tokens * group, head_dim)
    # A page viewed as rows of (slot, kv head): a free reshape of contiguous memory.
    k_rows = k_pages.reshape(num_pages, page_size * kv_heads, head_dim)
    v_rows = v_pages.reshape(num_pages, page_size * kv_heads, head_dim)

    kernel = functools.partial(
        _kernel,
        causal=causal,
        page_size=page_size,
        pages_per_block=pages_per_block,
        pages_per_seq=pages_per_seq,
        block_q=block_q,
        group=group,
        kv_heads=kv_heads,
        scale=1.0 / math.sqrt(head_dim),
    )
    row_block = lambda i, *_: (0, i, 0)  # noqa: E731 - index map
    buf_shape = (2, pages_per_block * page_size * kv_heads, head_dim)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(work),
        grid=(num_blocks,),
        in_specs=[
            pl.BlockSpec((kv_heads, rows, head_dim), row_block),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[
            pl.BlockSpec((kv_heads, rows, head_dim), row_block),
            pl.BlockSpec((kv_heads, rows, 1), row_block),
        ],
        scratch_shapes=[
            pltpu.VMEM(buf_shape, k_pages.dtype),
            pltpu.VMEM(buf_shape, v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
            pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
            pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32),
        ],
    )
    out_rows, lse_rows = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((kv_heads, padded_tokens * group, head_dim), q.dtype),
            jax.ShapeDtypeStruct((kv_heads, padded_tokens * group, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="paged_attention_causal" if causal else "paged_attention_prefix",
    )(*work, q_rows, k_rows, v_rows)

    out = out_rows.reshape(kv_heads, padded_tokens, group, head_dim)[:, :num_tokens]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, q_heads, head_dim)
    lse = lse_rows.reshape(kv_heads, padded_tokens, group)[:, :num_tokens]
    return out, lse.transpose(1, 0, 2).reshape(num_tokens, q_heads)
