"""Claims about the attention kernels: each equals its jnp oracle, and the oracles equal a naive
per-query softmax. Kernels run in the CPU interpreter; `gpu`/`tpu` marks compile them.

bf16 tolerance: inputs in bf16, accumulation in f32, probabilities cast to bf16 for the
value product; outputs agree with the f32-accumulated oracle to 2e-2 absolute, lse to 1e-2.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import (
    NO_KEYS_LSE,
    merge_attention_states,
    merge_attention_states_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    shared_prefix_attention,
    shared_prefix_attention_reference,
)
from pallas_kernels import paged_attention_mgpu as mgpu
from pallas_kernels.paged_attention_gpu import paged_attention_gpu
from pallas_kernels.paged_attention_tpu import paged_attention_tpu


class Shape(NamedTuple):
    tokens: int  # T
    q_heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    page_size: int
    pages_per_seq: int  # P
    num_seqs: int  # S
    dtype: str


class Batch(NamedTuple):
    q: jax.Array  # [T, Hq, D]
    k_pages: jax.Array  # [N, page_size, Hkv, D]
    v_pages: jax.Array
    page_tables: jax.Array  # [S, P]
    kv_lens: jax.Array  # [S]
    q_starts: jax.Array  # [S]
    q_lens: jax.Array  # [S]


def make_batch(shape: Shape, causal: bool, seed: int, fill: float) -> Batch:
    """A random, valid step: ragged sequences at random places in T, padding rows between
    them, padding sequences (q_len 0), and for prefixes also empty and one-key groups."""
    rng = np.random.default_rng(seed)
    s, p, page = shape.num_seqs, shape.pages_per_seq, shape.page_size
    num_pages = s * p + 3
    max_keys = p * page
    q_lens = np.zeros(s, np.int32)
    kv_lens = np.zeros(s, np.int32)
    q_starts = np.zeros(s, np.int32)
    cursor = 0
    for seq in rng.permutation(s)[: rng.integers(1, s + 1)]:
        room = shape.tokens - cursor
        if room <= 0:
            break
        q_len = int(rng.integers(0 if not causal else 1, max(1, int(room * fill)) + 1))
        q_len = min(q_len, room, max_keys)
        if causal:
            kv = int(rng.integers(q_len, max_keys + 1))
        else:
            kv = int(rng.choice([0, 1, rng.integers(1, max_keys + 1), max_keys]))
        gap = int(rng.integers(0, 3))
        if cursor + gap + q_len > shape.tokens:
            gap = 0
        q_starts[seq], q_lens[seq], kv_lens[seq] = cursor + gap, q_len, kv
        cursor += gap + q_len
    tables = rng.permutation(num_pages)[: s * p].reshape(s, p).astype(np.int32)
    dtype = jnp.dtype(shape.dtype)

    def normal(*dims):
        return jnp.asarray(rng.standard_normal(dims), jnp.float32).astype(dtype)

    kv_shape = (num_pages, page, shape.kv_heads, shape.head_dim)
    return Batch(
        normal(shape.tokens, shape.q_heads, shape.head_dim),
        normal(*kv_shape),
        normal(*kv_shape),
        jnp.asarray(tables),
        jnp.asarray(kv_lens),
        jnp.asarray(q_starts),
        jnp.asarray(q_lens),
    )


def case_id(shape: Shape) -> str:
    return f"{shape.dtype}-D{shape.head_dim}-p{shape.page_size}"


def tolerance(dtype: str) -> dict:
    return {"atol": 2e-2, "rtol": 2e-2} if dtype == "bfloat16" else {"atol": 2e-5, "rtol": 2e-5}


def assert_matches(got, want, dtype: str):
    out, lse = got
    want_out, want_lse = want
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(lse)))
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(want_out, np.float32), **tolerance(dtype)
    )
    lse_tol = {"atol": 1e-2, "rtol": 1e-3} if dtype == "bfloat16" else {"atol": 1e-4, "rtol": 1e-5}
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), **lse_tol)


def naive_attention(batch: Batch, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """One softmax per (query row, query head), written out in numpy loops."""
    q = np.asarray(batch.q, np.float64)
    k = np.asarray(batch.k_pages, np.float64)
    v = np.asarray(batch.v_pages, np.float64)
    tokens, q_heads, head_dim = q.shape
    page_size, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    lse = np.full((tokens, q_heads), NO_KEYS_LSE)
    for s in range(batch.page_tables.shape[0]):
        start, n, kv_len = int(batch.q_starts[s]), int(batch.q_lens[s]), int(batch.kv_lens[s])
        table = np.asarray(batch.page_tables[s])
        for i in range(n):
            visible = kv_len - n + i + 1 if causal else kv_len
            if visible <= 0:
                continue
            pos = np.arange(visible)
            keys = k[table[pos // page_size], pos % page_size]  # [visible, Hkv, D]
            values = v[table[pos // page_size], pos % page_size]
            for h in range(q_heads):
                kv_h = h // (q_heads // kv_heads)
                scores = keys[:, kv_h] @ q[start + i, h] / math.sqrt(head_dim)
                top = scores.max()
                weights = np.exp(scores - top)
                out[start + i, h] = weights @ values[:, kv_h] / weights.sum()
                lse[start + i, h] = top + np.log(weights.sum())
    return out, lse


SMALL = Shape(tokens=12, q_heads=4, kv_heads=2, head_dim=16, page_size=4, pages_per_seq=3,
              num_seqs=4, dtype="float32")


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), causal=st.booleans(), fill=st.sampled_from([0.2, 0.6]))
def test_references_equal_naive_per_query_softmax(seed, causal, fill):
    batch = make_batch(SMALL, causal, seed, fill)
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    out, lse = ref(*batch)
    want_out, want_lse = naive_attention(batch, causal)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-5, rtol=1e-6)


def test_shared_prefix_reference_with_row_bound_equals_unbounded():
    batch = make_batch(SMALL, False, seed=3, fill=0.3)
    bound = int(batch.q_lens.max())
    bounded = shared_prefix_attention_reference(*batch, max_group_q_len=bound)
    full = shared_prefix_attention_reference(*batch)
    np.testing.assert_allclose(np.asarray(bounded[0]), np.asarray(full[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(bounded[1]), np.asarray(full[1]), atol=1e-6)


def _split_context(batch: Batch, cut: np.ndarray) -> tuple[Batch, Batch]:
    """The first `cut[s]` keys of each sequence as a "prefix" batch, the rest as a causal one."""
    page = batch.k_pages.shape[1]
    cut = jnp.asarray(cut, jnp.int32)
    prefix = batch._replace(kv_lens=jnp.minimum(cut, batch.kv_lens))
    # The own part starts on a page boundary here, so its table is the tail of the sequence's.
    first_own_page = cut // page
    own_tables = jnp.take_along_axis(
        batch.page_tables,
        jnp.minimum(first_own_page[:, None] + jnp.arange(batch.page_tables.shape[1]),
                    batch.page_tables.shape[1] - 1),
        axis=1,
    )
    own = batch._replace(page_tables=own_tables, kv_lens=batch.kv_lens - cut)
    return prefix, own


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_merging_prefix_and_own_parts_equals_attention_over_the_whole_context(seed):
    batch = make_batch(SMALL, True, seed, fill=0.3)
    rng = np.random.default_rng(seed)
    page = SMALL.page_size
    # Cut every context at a page boundary that lies before its first query position.
    first_query = np.asarray(batch.kv_lens - batch.q_lens)
    cut = np.array([page * rng.integers(0, f // page + 1) for f in first_query], np.int32)
    prefix, own = _split_context(batch, cut)
    merged = merge_attention_states_reference(
        *shared_prefix_attention_reference(*prefix), *ragged_paged_attention_reference(*own)
    )
    whole = ragged_paged_attention_reference(*batch)
    np.testing.assert_allclose(np.asarray(merged[0]), np.asarray(whole[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(merged[1]), np.asarray(whole[1]), atol=1e-4)
    kernel_merged = merge_attention_states(
        *shared_prefix_attention_reference(*prefix), *ragged_paged_attention_reference(*own),
        interpret=True,
    )
    np.testing.assert_allclose(np.asarray(kernel_merged[0]), np.asarray(merged[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(kernel_merged[1]), np.asarray(merged[1]), atol=1e-6)


def test_merge_of_rows_without_keys_is_zero_and_finite():
    out = jnp.ones((3, 2, 8), jnp.float32)  # garbage that a zero weight must cancel
    no_keys = jnp.full((3, 2), NO_KEYS_LSE, jnp.float32)
    real = jnp.zeros((3, 2), jnp.float32)
    for merge in (merge_attention_states_reference,
                  functools.partial(merge_attention_states, interpret=True),
                  functools.partial(merge_attention_states, interpret=True, block_t=1)):
        both_empty = merge(out, no_keys, 2 * out, no_keys)
        assert float(jnp.abs(both_empty[0]).max()) == 0.0
        assert bool(jnp.all(both_empty[1] == NO_KEYS_LSE))
        one_side = merge(out, real, 5 * out, no_keys)
        np.testing.assert_allclose(np.asarray(one_side[0]), np.asarray(out))
        np.testing.assert_allclose(np.asarray(one_side[1]), np.asarray(real))


# Fixed shapes per case (each compiles once); hypothesis varies lengths, places and pages.
TPU_CASES = [
    Shape(24, 8, 2, 64, 16, 4, 5, "float32"),  # GQA 4, prefix over several key blocks
    Shape(16, 4, 4, 128, 32, 2, 3, "bfloat16"),  # MHA, D 128, bf16
    Shape(16, 2, 1, 64, 128, 1, 3, "float32"),  # one 128-slot page, GQA 2
]


@pytest.mark.parametrize("shape", TPU_CASES, ids=case_id)
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fill=st.sampled_from([0.1, 0.5, 1.0]))
def test_tpu_kernel_equals_reference(shape, causal, seed, fill):
    batch = make_batch(shape, causal, seed, fill)
    kernel = ragged_paged_attention if causal else shared_prefix_attention
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    got = kernel(*batch, interpret=True, block_q=8, backend="tpu")
    assert_matches(got, ref(*batch), shape.dtype)


def _races_found() -> bool:
    """The TPU interpreter's race flag. JAX exposes it only as module state, whose home has
    moved between releases; `test_race_detector_flags_a_racy_kernel` fails if it moves again,
    so a check that stopped looking cannot pass silently."""
    import importlib

    for module, attr in (("jax._src.pallas.mosaic.interpret.interpret_pallas_call", "races"),
                         ("jax._src.pallas.mosaic.interpret", "races")):
        try:
            races = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if races is not None and hasattr(races, "races_found"):
            return bool(races.races_found)
    raise AssertionError("this JAX keeps the TPU interpreter's race flag somewhere new")


def test_race_detector_flags_a_racy_kernel():
    # A kernel that reads its VMEM buffer while a DMA into it is still in flight.
    from jax.experimental import pallas as pl

    def racy(x_hbm, o_ref, buf, sem):
        copy = pltpu.make_async_copy(x_hbm, buf, sem)
        copy.start()
        o_ref[...] = buf[...] + 1.0
        copy.wait()

    x = jnp.ones((8, 128), jnp.float32)
    pl.pallas_call(
        racy,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA],
        interpret=pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager"),
    )(x).block_until_ready()
    assert _races_found()


@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_tpu_kernel_has_no_dma_races(causal, seed):
    shape = Shape(16, 4, 2, 64, 16, 3, 3, "float32")
    batch = make_batch(shape, causal, seed, fill=0.5)
    params = pltpu.InterpretParams(detect_races=True)
    got = paged_attention_tpu(*batch, causal=causal, block_q=8, pages_per_block=2,
                              interpret=params)
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    assert_matches(got, ref(*batch), shape.dtype)
    assert not _races_found()


GPU_CASES = [
    Shape(16, 8, 2, 64, 16, 3, 4, "float32"),
    Shape(16, 4, 4, 128, 32, 2, 3, "bfloat16"),
]


@pytest.mark.parametrize("shape", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fill=st.sampled_from([0.1, 0.5, 1.0]))
def test_gpu_kernel_equals_reference(shape, causal, seed, fill):
    batch = make_batch(shape, causal, seed, fill)
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    got = paged_attention_gpu(*batch, causal=causal, block_q=4, interpret=True)
    assert_matches(got, ref(*batch), shape.dtype)


# Mosaic GPU (Hopper wgmma) takes 16-bit operands, D a multiple of 64, pages of 8 to 128 tokens.
MGPU_CASES = [
    Shape(16, 8, 2, 64, 16, 3, 4, "bfloat16"),  # GQA 4: 4 query tokens x 4 heads per program
    Shape(16, 4, 4, 128, 32, 2, 3, "bfloat16"),  # MHA, D 128, two pages a step
    Shape(12, 6, 2, 64, 8, 9, 3, "bfloat16"),  # GQA 3 padded to 4, 8-token pages, 9 per seq
    Shape(8, 2, 1, 64, 128, 2, 3, "bfloat16"),  # one 128-key page a step
]
needs_mgpu_interpreter = pytest.mark.skipif(
    not mgpu.has_interpreter(),
    reason="Mosaic GPU's host interpreter arrived in jax 0.11; on older jax the lowering test "
    "checks this kernel and the gpu mark runs it",
)


@needs_mgpu_interpreter
@pytest.mark.parametrize("shape", MGPU_CASES, ids=case_id)
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fill=st.sampled_from([0.1, 0.5, 1.0]),
       kv_splits=st.sampled_from([1, 2, 3]))
def test_mosaic_gpu_kernel_equals_reference(shape, causal, seed, fill, kv_splits):
    batch = make_batch(shape, causal, seed, fill)
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    # Wait for the interpreted kernel before the reference runs: its host callbacks run jax
    # operations themselves, and on a 2-core host they can deadlock against new dispatches.
    got = jax.block_until_ready(mgpu.paged_attention_mgpu(
        *batch, causal=causal, block_q=4, kv_splits=kv_splits, interpret=True))
    assert_matches(got, ref(*batch), shape.dtype)


def _run_detecting_races(run):
    """(whether Mosaic GPU's interpreter saw a race, what `run` returned)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas import mosaic_gpu as plgpu

    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        result = jax.block_until_ready(run())
    return interpret_pallas_call.get_races().races_found, result


@needs_mgpu_interpreter
def test_mosaic_gpu_race_detector_fires_on_a_racy_kernel():
    """Positive control: a kernel that reads its shared buffer while the copy into it is in
    flight. If the detector stopped reporting, the race-free test below would prove nothing."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def racy(x):
        def body(x_ref, o_ref, smem, barrier):
            plgpu.copy_gmem_to_smem(x_ref, smem, barrier)
            smem[...] = smem[...] * 2.0  # before the wait: races with the copy
            plgpu.barrier_wait(barrier)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, o_ref)
            plgpu.wait_smem_to_gmem(0)

        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                            scratch_types=[plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier()])(x)

    assert _run_detecting_races(lambda: racy(jnp.ones((128, 64), jnp.float32)))[0]


@needs_mgpu_interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
def test_mosaic_gpu_kernel_has_no_races(causal):
    shape = MGPU_CASES[0]
    batch = make_batch(shape, causal, seed=5, fill=0.5)
    run = functools.partial(mgpu.paged_attention_mgpu, *batch, causal=causal, block_q=4,
                            kv_splits=2)
    races, got = _run_detecting_races(run)
    assert not races
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    assert_matches(got, ref(*batch), shape.dtype)


def test_mosaic_gpu_block_fits_64_rows_and_splits_follow_the_work():
    assert mgpu.rows_block_q(16, group=4) == 16  # 64 rows exactly
    assert mgpu.rows_block_q(16, group=3) == 16  # 3 heads padded to 4
    assert mgpu.rows_block_q(16, group=7) == 8  # 7 -> 8 heads, 8 tokens
    assert mgpu.rows_block_q(12, group=1) == 8  # a power of two, at most block_q
    assert mgpu.default_kv_splits(programs=1000, max_steps=64, cores=132) == 1
    assert mgpu.default_kv_splits(programs=32, max_steps=64, cores=132) == 9  # 264 / 32, up
    assert mgpu.default_kv_splits(programs=32, max_steps=8, cores=132) == 2  # >= 4 steps each
    with pytest.raises(ValueError, match="bf16 or f16"):
        mgpu.check_supported(jnp.float32, 64, 16, 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        mgpu.check_supported(jnp.bfloat16, 96, 16, 4)
    with pytest.raises(ValueError, match="page_size"):
        mgpu.check_supported(jnp.bfloat16, 64, 24, 4)  # 64 keys would not be whole pages
    assert [mgpu.keys_per_step(p) for p in (8, 16, 32, 64, 128)] == [64, 64, 64, 64, 128]


def _abstract(shape: Shape):
    sds = jax.ShapeDtypeStruct
    dtype = jnp.dtype(shape.dtype)
    kv = sds((shape.num_seqs * shape.pages_per_seq, shape.page_size, shape.kv_heads,
              shape.head_dim), dtype)
    meta = sds((shape.num_seqs,), jnp.int32)
    return (sds((shape.tokens, shape.q_heads, shape.head_dim), dtype), kv, kv,
            sds((shape.num_seqs, shape.pages_per_seq), jnp.int32), meta, meta, meta)


@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
def test_kernels_lower_for_tpu_and_gpu(causal):
    """Lowering to Mosaic (TPU) and to the GPU pipeline runs on the host; it catches shapes
    and operations the device compilers reject before any device is needed."""
    shape = Shape(64, 32, 8, 128, 16, 8, 8, "bfloat16")
    tpu = functools.partial(paged_attention_tpu, causal=causal)
    jax.export.export(jax.jit(tpu), platforms=["tpu"])(*_abstract(shape))
    gpu = functools.partial(paged_attention_gpu, causal=causal)
    jax.jit(gpu).trace(*_abstract(shape)).lower(lowering_platforms=("cuda",))
    for splits in (1, 4):
        mosaic = functools.partial(mgpu.paged_attention_mgpu, causal=causal, kv_splits=splits)
        lowered = jax.jit(mosaic).trace(*_abstract(shape)).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def _compiled_case(causal: bool, dtype: str, **kernel_args):
    shape = Shape(256, 32, 8, 128, 64, 8, 16, dtype)
    batch = make_batch(shape, causal, seed=7, fill=0.5)
    kernel = ragged_paged_attention if causal else shared_prefix_attention
    ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
    # f32 products on a GPU default to TF32 (about 1e-3 off), in XLA and in Triton alike; the
    # kernels follow jax's matmul precision setting, so ask both sides for full f32.
    with jax.default_matmul_precision("highest"):
        assert_matches(kernel(*batch, **kernel_args), ref(*batch), dtype)


@pytest.mark.tpu
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_tpu_kernel_equals_reference(causal, dtype):
    _compiled_case(causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_gpu_kernel_equals_reference(causal, dtype):
    _compiled_case(causal, dtype, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["ragged", "prefix"])
@pytest.mark.parametrize("kv_splits", [1, 4, None])
@pytest.mark.parametrize("shape", MGPU_CASES + [Shape(256, 32, 8, 128, 64, 8, 16, "bfloat16")],
                         ids=case_id)
def test_compiled_mosaic_gpu_kernel_equals_reference(causal, kv_splits, shape):
    for seed in range(3):
        batch = make_batch(shape, causal, seed=seed, fill=0.5)
        ref = ragged_paged_attention_reference if causal else shared_prefix_attention_reference
        got = mgpu.paged_attention_mgpu(*batch, causal=causal, kv_splits=kv_splits)
        assert_matches(got, ref(*batch), shape.dtype)


@pytest.mark.gpu
def test_gpu_backend_picks_mosaic_for_bf16_and_triton_for_f32():
    for dtype, variant in (("bfloat16", "mosaic_gpu"), ("float32", "triton")):
        batch = make_batch(Shape(64, 8, 2, 64, 16, 4, 8, dtype), True, seed=1, fill=0.5)
        chosen = ragged_paged_attention(*batch, backend=variant)
        default = ragged_paged_attention(*batch)
        np.testing.assert_array_equal(np.asarray(default[0], np.float32),
                                      np.asarray(chosen[0], np.float32))
