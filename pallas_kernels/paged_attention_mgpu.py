"""Paged flash attention for Hopper GPUs through Mosaic GPU: the `paged_attention_gpu` contract.

One program per (query block, kv head, kv split). Its rows are one kv head's query heads for
`block_q` tokens, laid out head-major (`row = r * block_q + t`: query head `kv * group + r`,
token `block_start + t`) and padded to 64, the row count of one `wgmma`. For every sequence
that owns some of those tokens the program walks the sequence's pages `keys_per_step` keys at a
time:

* the pages of a step are copied into shared memory by the TMA engine, one copy per page
  (a page is a strided `[page_size, D]` box of the `[N, page_size, Hkv, D]` pool), two steps in
  flight: the next step's pages are on their way while this one is computed;
* scores are `wgmma(q, k^T)` into f32 registers, the online softmax runs in registers, and the
  probabilities go back to the operand dtype for `wgmma(p, v)`.

`kv_splits > 1` gives each program a contiguous share of every sequence's steps (flash-decoding):
a decode step over long shared prefixes has few query blocks, and splitting the keys puts more
programs on the GPU's 132 multiprocessors. The splits' partial results are merged by
log-sum-exp outside the kernel.

Limits, all from Hopper's `wgmma`: 16-bit operands (f32 operands would be TF32 and cannot be
transposed, which the value product needs), `D` a multiple of 64, pages of 8, 16, 32, 64 or 128,
at most 64 query heads per kv head. f32 pools use the Triton variant (`paged_attention_gpu`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_metadata import block_work
from pallas_kernels.reference import NO_KEYS_LSE, merge_attention_states_reference

ROWS = 64  # wgmma's M: one warpgroup's rows
SWIZZLE = 128  # bytes; 64 bf16 elements, so D must be a multiple of 64


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def has_interpreter() -> bool:
    """Mosaic GPU's host interpreter (`interpret=True`) arrived in jax 0.11."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return hasattr(plgpu, "InterpretGPUParams")


def check_supported(q_dtype, head_dim: int, page_size: int, group: int) -> None:
    """Raises ValueError naming the first limit of the Mosaic GPU variant the shape breaks."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"the Mosaic GPU kernel takes bf16 or f16 operands, got {q_dtype}")
    if head_dim % 64:
        raise ValueError(f"head_dim must be a multiple of 64 for wgmma, got {head_dim}")
    if page_size not in (8, 16, 32, 64, 128):
        # A step's keys are the value product's K: whole pages adding up to 64 or 128.
        raise ValueError(f"page_size must be 8, 16, 32, 64 or 128, got {page_size}")
    if group > ROWS:
        raise ValueError(f"at most {ROWS} query heads per kv head, got {group}")


def rows_block_q(block_q: int, group: int) -> int:
    """The query tokens one program takes: `block_q`, or less where `block_q` query tokens of
    `group` heads would not fit 64 rows; a power of two, so a row's token is `row & (bq - 1)`."""
    most = max(1, min(block_q, ROWS // _next_pow2(group)))
    return 1 << (most.bit_length() - 1)


def default_kv_splits(programs: int, max_steps: int, cores: int | None = None) -> int:
    """Enough splits of the keys for about two programs per multiprocessor (`cores`: the
    default device's, 132 where it does not say), each split keeping at least 4 steps."""
    if cores is None:
        cores = getattr(jax.devices()[0], "core_count", None) or 132
    want = -(-2 * cores // max(programs, 1))
    return max(1, min(want, max_steps // 4, 16))


def keys_per_step(page_size: int) -> int:
    """Whole pages adding up to 64 keys (128 for 128-key pages): the value product's K must be a
    multiple of 64, wgmma's K step for 16-bit operands with a 128-byte swizzle."""
    return max(64, page_size)


def _kernel(
    block_first_ref,  # [num_blocks] int32, see paged_metadata.BlockWork; all in GPU memory
    block_end_ref,
    tables_ref,  # [S * P]
    kv_lens_ref,  # [S]
    q_starts_ref,
    q_lens_ref,
    q_ref,  # [Hkv, num_blocks, ROWS, D]
    k_ref,  # [num_pages, page_size, Hkv, D]
    v_ref,
    out_ref,  # [kv_splits, Hkv, num_blocks, ROWS, D]
    lse_ref,  # [kv_splits, Hkv, num_blocks, ROWS] float32
    qo_smem,  # [ROWS, D]: the queries, then the output
    k_smem,  # [2, keys, D]
    v_smem,
    p_smem,  # [ROWS, keys]: one step's probabilities, the value product's left operand
    lse_smem,  # [ROWS] float32
    q_barrier,
    k_barriers,  # 2 barriers, one arrival per page copy
    v_barriers,
    *,
    causal: bool,
    page_size: int,
    pages_per_seq: int,
    block_q: int,
    kv_splits: int,
    scale: float,
):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    keys = k_smem.shape[1]
    pages_per_step = keys // page_size
    block = lax.axis_index("block")
    head = lax.axis_index("head")
    split = lax.axis_index("split")
    block_start = block * block_q

    plgpu.copy_gmem_to_smem(q_ref.at[head, block], qo_smem, q_barrier)

    wgmma_layout = plgpu.Layout.WGMMA
    row = plgpu.broadcasted_iota(jnp.int32, (ROWS, keys), 0, layout=wgmma_layout)
    key_in_step = plgpu.broadcasted_iota(jnp.int32, (ROWS, keys), 1, layout=wgmma_layout)
    # Rows are head-major, so a row's token is its index modulo block_q (a power of two).
    row_token = block_start + (row & (block_q - 1))

    def fetch(seq, step, slot):
        for j in range(pages_per_step):
            page_idx = jnp.minimum(step * pages_per_step + j, pages_per_seq - 1)
            page = tables_ref[seq * pages_per_seq + page_idx]
            rows = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(
                k_ref.at[page, :, head, :], k_smem.at[slot, rows], k_barriers.at[slot]
            )
            plgpu.copy_gmem_to_smem(
                v_ref.at[page, :, head, :], v_smem.at[slot, rows], v_barriers.at[slot]
            )

    def attend_sequence(seq, state):
        kv_len = kv_lens_ref[seq]
        q_start = q_starts_ref[seq]
        q_len = q_lens_ref[seq]
        if causal:
            last_row = jnp.minimum(q_start + q_len, block_start + block_q) - 1
            key_end = jnp.minimum(kv_len, kv_len - q_len + (last_row - q_start) + 1)
        else:
            key_end = kv_len
        steps = lax.div(jnp.maximum(key_end, 0) + keys - 1, keys)
        per_split = lax.div(steps + kv_splits - 1, kv_splits)
        first = jnp.minimum(split * per_split, steps)
        last = jnp.minimum(first + per_split, steps)
        owned = (row_token >= q_start) & (row_token < q_start + q_len)

        @pl.when(first < last)
        def _():
            fetch(seq, first, 0)

        def attend_step(i, state):
            m_prev, l_prev, acc = state
            step = first + i
            slot = lax.rem(i, 2)

            @pl.when(step + 1 < last)
            def _():
                fetch(seq, step + 1, 1 - slot)

            plgpu.barrier_wait(k_barriers.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            scores = pl.run_scoped(qk, plgpu.ACC((ROWS, keys), jnp.float32))
            key_pos = step * keys + key_in_step
            mask = owned & (key_pos < key_end)
            if causal:
                mask = mask & (key_pos <= kv_len - q_len - q_start + row_token)
            scores = jnp.where(mask, scores * scale, NO_KEYS_LSE)
            m_new = jnp.maximum(m_prev, scores.max(axis=1))
            probs = jnp.where(
                mask, jnp.exp(scores - lax.broadcast_in_dim(m_new, scores.shape, [0])), 0.0
            )
            alpha = jnp.exp(m_prev - m_new)
            l_new = alpha * l_prev + probs.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            # The probabilities go through shared memory: wgmma can take its left operand from
            # registers, but Mosaic GPU's interpreter cannot, and this keeps one program for both.
            p_smem[...] = probs.astype(p_smem.dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_barriers.at[slot])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                return acc_ref[...]

            # A fresh accumulator per step rather than `run_state` over the running one: one
            # more [ROWS, D] add in registers, and Mosaic GPU's interpreter can run it.
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, acc.shape[1]), jnp.float32))
            return m_new, l_new, acc

        return lax.fori_loop(0, last - first, attend_step, state)

    head_dim = qo_smem.shape[-1]
    init = (
        plgpu.layout_cast(jnp.full((ROWS,), NO_KEYS_LSE, jnp.float32), wgmma_layout.reduce(1)),
        plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1)),
        plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma_layout),
    )
    plgpu.barrier_wait(q_barrier)
    m, denom, acc = lax.fori_loop(
        block_first_ref[block], block_end_ref[block], attend_sequence, init
    )
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    qo_smem[...] = (acc / lax.broadcast_in_dim(safe, acc.shape, [0])).astype(qo_smem.dtype)
    lse_smem[...] = jnp.where(seen, m + jnp.log(safe), NO_KEYS_LSE)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[split, head, block])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, head, block])
    plgpu.wait_smem_to_gmem(0)


def merge_splits(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """out: [splits, ..., D], lse: [splits, ...] -> the splits merged one after another by
    `merge_attention_states_reference`, in f32 until the end."""
    merged = (out[0].astype(jnp.float32), lse[0])
    for split in range(1, out.shape[0]):
        merged = merge_attention_states_reference(*merged, out[split], lse[split])
    return merged[0].astype(out.dtype), merged[1]


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "kv_splits", "interpret"))
def paged_attention_mgpu(
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
    kv_splits: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D]; k_pages, v_pages: [N, page_size, Hkv, D]; page_tables: [S, P];
    kv_lens, q_starts, q_lens: [S]. Returns out: [T, Hq, D] and lse: [T, Hq] float32.
    `block_q` is lowered to fit 64 rows (see `rows_block_q`); `kv_splits=None` picks
    `default_kv_splits`. `interpret=True` runs Mosaic GPU's own interpreter on the host
    (jax >= 0.11).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_tokens, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = q_heads // kv_heads
    check_supported(q.dtype, head_dim, page_size, group)
    block_q = rows_block_q(block_q, group)
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k_pages.dtype}, "
                         f"{v_pages.dtype}")
    num_blocks = -(-num_tokens // block_q)
    padded_tokens = num_blocks * block_q
    used_rows = group * block_q
    work = block_work(num_blocks, block_q, num_pages, page_tables, kv_lens, q_starts, q_lens)

    # q: [T, Hq, D] -> [Hkv, blocks, ROWS, D], rows head-major within a block, zero padded.
    q_rows = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(num_blocks, block_q, kv_heads, group, head_dim)
    q_rows = q_rows.transpose(2, 0, 3, 1, 4).reshape(kv_heads, num_blocks, used_rows, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, ROWS - used_rows), (0, 0)))

    keys = keys_per_step(page_size)
    if kv_splits is None:
        max_steps = -(-page_tables.shape[1] * page_size // keys)
        kv_splits = default_kv_splits(num_blocks * kv_heads, max_steps)
    tiled = (
        plgpu.TilingTransform((8, SWIZZLE // q.dtype.itemsize)),
        plgpu.SwizzleTransform(SWIZZLE),
    )
    kernel = plgpu.kernel(
        functools.partial(
            _kernel,
            causal=causal,
            page_size=page_size,
            pages_per_seq=page_tables.shape[1],
            block_q=block_q,
            kv_splits=kv_splits,
            scale=1.0 / math.sqrt(head_dim),
        ),
        out_type=(
            jax.ShapeDtypeStruct((kv_splits, kv_heads, num_blocks, ROWS, head_dim), q.dtype),
            jax.ShapeDtypeStruct((kv_splits, kv_heads, num_blocks, ROWS), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=tiled),
            plgpu.SMEM((2, keys, head_dim), q.dtype, transforms=tiled),
            plgpu.SMEM((2, keys, head_dim), q.dtype, transforms=tiled),
            plgpu.SMEM((ROWS, keys), q.dtype, transforms=tiled),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=keys // page_size, num_barriers=2),
            plgpu.Barrier(num_arrivals=keys // page_size, num_barriers=2),
        ),
        grid=(num_blocks, kv_heads, kv_splits),
        grid_names=("block", "head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="paged_attention_causal" if causal else "paged_attention_prefix",
    )
    out_rows, lse_rows = kernel(*work, q_rows, k_pages, v_pages)
    if kv_splits > 1:
        out_rows, lse_rows = merge_splits(out_rows, lse_rows)
    else:
        out_rows, lse_rows = out_rows[0], lse_rows[0]

    # [Hkv, blocks, ROWS, D] -> [T, Hq, D]
    out = out_rows[:, :, :used_rows].reshape(kv_heads, num_blocks, group, block_q, head_dim)
    out = out.transpose(1, 3, 0, 2, 4).reshape(padded_tokens, q_heads, head_dim)[:num_tokens]
    lse = lse_rows[:, :, :used_rows].reshape(kv_heads, num_blocks, group, block_q)
    lse = lse.transpose(1, 3, 0, 2).reshape(padded_tokens, q_heads)[:num_tokens]
    return out, lse
