"""The native CPU kernels compute what their plain jnp references compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batchjax.attention import xla
from batchjax.engine import step as step_module
from batchjax.kernels import native as native_kernels
from batchjax.kernels import packed_matmul as pm
from batchjax.kernels import paged_attention as pa

HAS_CPU = native_kernels.cpu_has_avx2_fma()
native = pytest.mark.skipif(not HAS_CPU, reason="the native kernels need x86-64 AVX2 and FMA")
HAS_BF16 = HAS_CPU and native_kernels.cpu_has_avx512_bf16()
# Every bf16 panel layout this machine can run: the AVX2 one everywhere the kernels run, the
# AVX512-BF16 one only where the CPU has it (skipped, with the reason, elsewhere).
BF16_LAYOUTS = ["widen", pytest.param("pairs", marks=pytest.mark.skipif(
    not HAS_BF16, reason="this CPU has no AVX512-BF16 (avx512_bf16 in /proc/cpuinfo)"))]


def test_pack_round_trips_and_lays_columns_out_in_panels():
    w = np.arange(3 * 5 * 48, dtype=np.float32).reshape(3, 5, 48)
    wp = pm.pack(w)
    assert wp.shape == (3, 3, 5, 16)
    np.testing.assert_array_equal(wp[1, 2, 4], w[1, 4, 32:48])  # panel 2 = columns 32..47
    np.testing.assert_array_equal(pm.unpack(wp), w)
    with pytest.raises(ValueError, match="divisible by 16"):
        pm.pack(np.zeros((4, 40), np.float32))


def test_bf16_panels_keep_the_bits_interleaved_for_the_kernel():
    w = jnp.asarray(np.arange(5 * 32).reshape(5, 32) / 7, jnp.bfloat16)
    wp = pm.pack(w)
    assert wp.shape == (2, 5, 16) and wp.dtype == jnp.uint16  # bf16 bits, half of f32's bytes
    row = jax.lax.bitcast_convert_type(wp[1, 3], jnp.bfloat16)  # panel 1, k = 3
    # Columns 16..31 stored 16, 24, 17, 25, ...: even slots the panel's first 8, odd its last.
    np.testing.assert_array_equal(row[0::2], w[3, 16:24])
    np.testing.assert_array_equal(row[1::2], w[3, 24:32])
    assert pm.unpack(wp).dtype == jnp.bfloat16
    np.testing.assert_array_equal(pm.unpack(wp), w)
    with pytest.raises(TypeError, match="f32 or bf16"):
        pm.pack(np.zeros((4, 16), np.float16))


def test_bf16_pairs_keep_each_row_pair_column_by_column():
    w = jnp.asarray(np.arange(6 * 32).reshape(6, 32) / 7, jnp.bfloat16)
    wp = pm.pack(w, "pairs")
    assert wp.shape == (2, 3, 32) and wp.dtype == jnp.uint16
    pair = jax.lax.bitcast_convert_type(wp[1, 2], jnp.bfloat16)  # panel 1, rows 4 and 5
    np.testing.assert_array_equal(pair[0::2], w[4, 16:32])
    np.testing.assert_array_equal(pair[1::2], w[5, 16:32])
    np.testing.assert_array_equal(pm.unpack(wp), w)
    with pytest.raises(ValueError, match="even K"):
        pm.pack(jnp.zeros((5, 16), jnp.bfloat16), "pairs")


@native
def test_the_kernels_build_on_a_cpu_that_can_run_them():
    # Where the CPU qualifies, a failed build is a bug, not a reason to skip.
    assert native_kernels.unavailable_reason() is None


# Rows cover the 6-row micro-kernel with every tail (1..5) and the 48-row blocks; widths give
# one panel, chunks that do not divide the panels, and more panels than one chunk holds.
@native
@pytest.mark.parametrize("m,k,n", [(1, 8, 16), (5, 64, 48), (7, 576, 960), (13, 33, 160),
                                   (48, 100, 256), (49, 24, 32), (100, 1536, 96)])
def test_native_matmul_matches_the_jnp_product(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    layers = 3
    w = rng.standard_normal((layers, k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    wp = pm.pack(w)
    fn = jax.jit(pm.packed_matmul)
    for layer in range(layers):  # each layer's own weights, not layer 0's
        got = np.asarray(fn(x, wp, layer))
        want = np.asarray(pm.packed_matmul_reference(x, wp, layer))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


# The pairs kernels: VDPBF16PS's 8-row micro-kernels with every tail, 64-row blocks, panels
# taken two at a time and a last odd one, K with and without a tail past 32 values; AMX's
# 32-row blocks with partial tiles (K a multiple of 32; others go to VDPBF16PS).
@pytest.fixture(params=["amx", "avx512"])
def products(request, monkeypatch):
    if request.param == "amx" and not native_kernels.cpu_has_amx_bf16():
        pytest.skip("this CPU has no AMX-BF16 (amx_bf16, amx_tile in /proc/cpuinfo)")
    if request.param == "avx512":
        monkeypatch.setenv("BATCHJAX_CPU_BF16", "avx512")  # read by the kernel at each call
    return request.param


@native
@pytest.mark.parametrize("layout", BF16_LAYOUTS)
@pytest.mark.parametrize("m,k,n", [(1, 8, 16), (7, 576, 960), (13, 34, 160), (49, 24, 32),
                                   (65, 1536, 48), (9, 576, 49152 // 64)])
def test_native_bf16_matmul_matches_the_f32_product_of_the_bf16_values(m, k, n, layout,
                                                                       products):
    rng = np.random.default_rng(m * 1000 + n)
    w = jnp.asarray(rng.standard_normal((2, k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wp = pm.pack(w, layout)
    for layer in range(2):
        got = jax.jit(pm.packed_matmul)(x, wp, layer)
        assert got.dtype == jnp.bfloat16
        # Exact f32 products of the bf16 values, then rounded to bf16: the two sums differ
        # in order only, so at most by one bf16 step.
        want = jnp.dot(x.astype(jnp.float32), w[layer].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(np.asarray(got, np.float32), want,
                                   rtol=2**-7, atol=1e-5 * np.sqrt(k))


@native
@pytest.mark.parametrize("dtype,layout", [(jnp.float32, "widen"), (jnp.bfloat16, "widen"),
                                          pytest.param(jnp.bfloat16, "pairs",
                                                       marks=BF16_LAYOUTS[1].marks)])
def test_native_matmul_multiplies_only_the_real_rows_and_zeroes_the_padding(dtype, layout):
    rng = np.random.default_rng(7)
    m, k, n = 13, 40, 48
    w = jnp.asarray(rng.standard_normal((2, k, n)), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # padding rows hold real values too
    wp = pm.pack(w, layout)
    fn = jax.jit(pm.packed_matmul)  # one program for every count: `rows` is traced
    programs = None
    for rows in (0, 1, 6, 7, 13, 20):
        got = np.asarray(fn(x, wp, 1, np.int32(rows)), np.float32)
        want = np.asarray(pm.packed_matmul_reference(x, wp, 1, rows), np.float32)
        real = min(rows, m)
        assert not np.any(got[real:]), rows  # exactly 0, not the padding rows' products
        np.testing.assert_allclose(got[:real], want[:real], rtol=2**-7 if dtype == jnp.bfloat16
                                   else 1e-5, atol=1e-4 * np.sqrt(k))
        assert np.all(got[:real] != 0)
        programs = programs or fn._cache_size()
        assert fn._cache_size() == programs


@native
def test_native_matmul_in_a_scan_reads_each_layer_of_the_stacked_operand():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 32, 32)).astype(np.float32) / 6
    x0 = rng.standard_normal((3, 32)).astype(np.float32)
    wp = pm.pack(w)

    def run(matmul):
        def body(x, layer):
            return jnp.tanh(matmul(x, layer)), None
        return jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(4))[0])(x0)

    got = run(lambda x, layer: pm.packed_matmul(x, wp, layer))
    want = run(lambda x, layer: pm.packed_matmul_reference(x, wp, layer))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@native
def test_native_matmul_refuses_a_layer_out_of_range_and_wrong_dtypes():
    wp = pm.pack(np.ones((2, 8, 16), np.float32))
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(jax.jit(pm.packed_matmul)(jnp.ones((2, 8)), wp, 2))
    with pytest.raises(TypeError, match="f32 or bf16 rows"):
        pm.packed_matmul(jnp.ones((2, 8), jnp.float16), wp, 0)
    with pytest.raises(TypeError, match="panels"):
        pm.packed_matmul(jnp.ones((2, 8)), wp.astype(jnp.bfloat16), 0)  # not from `pack`


def test_turning_the_kernels_off_is_reported(monkeypatch):
    monkeypatch.setenv("BATCHJAX_NATIVE_KERNELS", "0")
    native_kernels._load.cache_clear()
    try:
        assert "BATCHJAX_NATIVE_KERNELS=0" in native_kernels.unavailable_reason()
        assert step_module.choose_cpu_kernels("auto", jnp.float32) == "xla"
        with pytest.raises(ValueError, match="cannot run here"):
            step_module.choose_cpu_kernels("native", jnp.float32)
    finally:
        monkeypatch.undo()
        native_kernels._load.cache_clear()


def test_choose_cpu_kernels_keeps_xla_where_the_kernels_do_not_apply():
    assert step_module.choose_cpu_kernels("xla", jnp.float32) == "xla"
    assert step_module.choose_cpu_kernels("xla", jnp.bfloat16) == "xla"
    assert step_module.choose_cpu_kernels("auto", jnp.float16) == "xla"
    with pytest.raises(ValueError, match="float32 and bfloat16, not float16"):
        step_module.choose_cpu_kernels("native", jnp.float16)
    with pytest.raises(ValueError, match="unknown cpu_kernels"):
        step_module.choose_cpu_kernels("fast", jnp.float32)
    want = "native" if HAS_CPU else "xla"
    assert step_module.choose_cpu_kernels("auto", jnp.float32) == want
    assert step_module.choose_cpu_kernels("auto", jnp.bfloat16) == want


@native
def test_model_step_packs_every_dense_kernel_and_leaves_placeholders(tiny_llama_dir):
    from batchjax.models.registry import load_model

    model = load_model(str(tiny_llama_dir)).model
    step = step_module.ModelStep(model, cpu_kernels="native")
    packed = step.params["packed"]
    assert set(packed) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}
    layers = step.params["layers"]
    assert layers["self_attn"]["qkv_proj"]["kernel"][...].size == 0  # nothing left to slice
    # The packed panels hold the model's own weights, layer by layer.
    np.testing.assert_array_equal(pm.unpack(packed["o_proj"])[1],
                                  model.layers[1].self_attn.o_proj.kernel[...])
    np.testing.assert_array_equal(pm.unpack(packed["lm_head"])[0], model.lm_head.kernel[...])
    # The caller's model keeps its weights.
    assert model.layers[0].mlp.down_proj.kernel[...].size > 0
    assert isinstance(model.layers[0].mlp.down_proj.kernel, nnx.Param)


@native
def test_model_step_packs_bf16_weights_as_bf16(tiny_llama_dir):
    from batchjax.models.registry import load_model

    model = load_model(str(tiny_llama_dir), dtype=jnp.bfloat16).model
    step = step_module.ModelStep(model)
    assert step.cpu_kernels == "native"
    packed = step.params["packed"]
    assert all(wp.dtype == jnp.uint16 for wp in packed.values())  # 2 bytes a weight
    np.testing.assert_array_equal(pm.unpack(packed["gate_up_proj"])[1][:, :128],
                                  model.layers[1].mlp.gate_proj.kernel[...])
    # The CPU's fastest layout, chosen at run time, and reported as such.
    width = 2 * pm.PANEL if HAS_BF16 else pm.PANEL
    assert all(wp.shape[-1] == width for wp in packed.values())
    fast = "amx_bf16" if native_kernels.cpu_has_amx_bf16() else "avx512_bf16"
    assert step.bf16_matmul == (fast if HAS_BF16 else "avx2_fma")


@native
def test_the_bf16_layout_can_be_held_to_the_avx2_path(tiny_llama_dir, monkeypatch):
    from batchjax.models.registry import load_model

    monkeypatch.setenv("BATCHJAX_CPU_BF16", "widen")
    step = step_module.ModelStep(load_model(str(tiny_llama_dir), dtype=jnp.bfloat16).model)
    assert step.bf16_matmul == "avx2_fma"
    assert all(wp.shape[-1] == pm.PANEL for wp in step.params["packed"].values())


def _paged_problem(rng, rows, nq, hq, hkv, d, page, pages_per_row, layers=2, num_pages=40):
    k = rng.standard_normal((layers, num_pages, page, hkv, d)).astype(np.float32)
    v = rng.standard_normal((layers, num_pages, page, hkv, d)).astype(np.float32)
    q = rng.standard_normal((rows, nq, hq, d)).astype(np.float32)
    table = np.stack([rng.permutation(num_pages)[:pages_per_row] for _ in range(rows)])
    return q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(table.astype(np.int32))


def _ragged_problem(rng, lens, hq, hkv, d, page, ppr, causal, layers=2):
    """Sequences of `lens` queries (0: padding) laid out flat with two unowned rows at the
    end; kv lens that end mid-page or fill the table (causal: at least the query count)."""
    q, k, v, _ = _paged_problem(rng, 1, 1, hq, hkv, d, page, ppr, layers)
    s = len(lens)
    t = sum(lens) + 2
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    table = np.stack([rng.permutation(k.shape[1])[:ppr] for _ in range(s)]).astype(np.int32)
    q_len = np.asarray(lens, np.int32)
    q_start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    lo = q_len if causal else np.ones(s, np.int32)
    kv_len = np.asarray([rng.integers(min(a, page * ppr), page * ppr + 1) for a in lo], np.int32)
    kv_len[0] = page * ppr
    return q, k, v, jnp.asarray(table), kv_len, q_start, q_len


def _ragged_reference(q, k, v, table, kv_len, q_start, q_len, causal, layer):
    return xla.ragged_paged_attention(
        jnp.asarray(q, jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), table,
        jnp.asarray(kv_len), jnp.asarray(q_start), jnp.asarray(q_len), causal=causal,
        layer=layer)


def _native_ragged(*args, causal, layer):
    return jax.jit(lambda *a: pa.ragged_paged_attention(*a, causal=causal, layer=layer))(*args)


# Page sizes below, at and above the 8 lanes the kernel's softmax pads to, and ones its 4-key
# score tiles do not divide; sequences of 1 query (decode), a few, 16 (a group's decode rows)
# and 70 (two items of 64), and padding ones (0); GQA groups of 1 to 4, so the 3-row tiles
# leave remainders of 1 and 2; head sizes whose columns split into 32-wide tiles and 8-wide
# rests; causal (own part) and not (prefix part).
@native
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,hq,hkv,d,page,ppr", [
    ((1, 1, 0, 1, 1, 1), 9, 3, 64, 16, 6), ((4, 4, 0, 4, 4), 9, 3, 64, 16, 5),
    ((1, 70, 1), 4, 4, 16, 4, 20), ((2, 2, 2, 0, 2, 2, 2), 8, 2, 32, 12, 4),
    ((3, 3), 8, 2, 8, 8, 3), ((16, 16, 16), 9, 3, 40, 6, 5), ((1, 5, 1, 0), 4, 2, 24, 7, 6)])
def test_native_ragged_attention_matches_the_jnp_reference(lens, hq, hkv, d, page, ppr, causal):
    rng = np.random.default_rng(sum(lens) * 100 + page)
    q, k, v, table, kv_len, q_start, q_len = _ragged_problem(rng, lens, hq, hkv, d, page, ppr,
                                                             causal)
    # A padding sequence reads no page, not even an invalid one.
    bad_padding = table.at[np.asarray(lens) == 0, :].set(10**6)
    for layer in (0, 1):
        got_o, got_l = _native_ragged(q, k, v, bad_padding, kv_len, q_start, q_len,
                                      causal=causal, layer=layer)
        want_o, want_l = _ragged_reference(q, k, v, table, kv_len, q_start, q_len, causal, layer)
        np.testing.assert_allclose(got_o, want_o, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(got_l, want_l, rtol=2e-5, atol=2e-5)
    # The two rows no sequence owns: out 0, lse MASK_VALUE.
    assert np.all(np.asarray(got_o)[-2:] == 0)
    assert np.all(np.asarray(got_l)[-2:] == xla.MASK_VALUE)


# bf16 pools: head sizes of one and of several 16-value loads, value tiles of 16 columns and
# a rest; GQA remainders; decode rows (pages read as bf16) and sequences of several queries
# (pages widened to f32 once); pools as the engine keeps them (bf16 bits in uint16) and as
# plain bf16.
@native
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,hq,hkv,d,page,ppr", [
    ((1, 1, 1, 1, 1), 9, 3, 64, 16, 6), ((16, 16, 16), 9, 3, 48, 6, 5),
    ((2, 2, 2, 2), 4, 2, 16, 7, 6)])
def test_native_ragged_attention_over_bf16_pools(lens, hq, hkv, d, page, ppr, causal):
    rng = np.random.default_rng(sum(lens) * 100 + page)
    q, k, v, table, kv_len, q_start, q_len = _ragged_problem(rng, lens, hq, hkv, d, page, ppr,
                                                             causal)
    q, k, v = (a.astype(jnp.bfloat16) for a in (jnp.asarray(q), k, v))
    bits = [jax.lax.bitcast_convert_type(a, jnp.uint16) for a in (k, v)]
    for layer in (0, 1):
        # The kernel's arithmetic is f32, so its reference is f32 over the same bf16 values.
        want_o, want_l = _ragged_reference(q, k, v, table, kv_len, q_start, q_len, causal, layer)
        for pools in (bits, (k, v)):
            got_o, got_l = _native_ragged(q, *pools, table, kv_len, q_start, q_len,
                                          causal=causal, layer=layer)
            np.testing.assert_allclose(got_o, want_o, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(got_l, want_l, rtol=2e-5, atol=2e-5)


@native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_lone_prefix_group_is_cut_into_parts_that_change_no_bit(dtype):
    # One group of 16 queries (a step's only prefix problem) is cut into parts of score tiles,
    # some starting mid-way through a KV head's query rows; eight copies of it are not cut.
    rng = np.random.default_rng(11)
    q, k, v, table, _, _, _ = _ragged_problem(rng, (16,), 9, 3, 64, 16, 6, False)
    q, k, v = (a.astype(dtype) for a in (jnp.asarray(q[:16]), k, v))
    kv_len, one = np.array([83], np.int32), np.array([0], np.int32)
    alone = _native_ragged(q, k, v, table, kv_len, one, one + 16, causal=False, layer=1)
    copies = _native_ragged(jnp.tile(q, (8, 1, 1)), k, v, jnp.tile(table, (8, 1)),
                            np.tile(kv_len, 8), np.arange(8, dtype=np.int32) * 16,
                            np.full(8, 16, np.int32), causal=False, layer=1)
    for got, many in zip(alone, copies):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(many)[:16])
        np.testing.assert_array_equal(np.asarray(many)[:16], np.asarray(many)[-16:])
    want = _ragged_reference(q, k, v, table, kv_len, one, one + 16, False, 1)
    for got, w in zip(alone, want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-5)


@native
def test_native_ragged_attention_without_a_layer_and_through_the_switch():
    rng = np.random.default_rng(7)
    q, k, v, table, kv_len, q_start, q_len = _ragged_problem(rng, (1, 3, 1), 6, 2, 16, 4, 5,
                                                             True, layers=1)
    args = (jnp.asarray(q), k[0], v[0], table, jnp.asarray(kv_len), jnp.asarray(q_start),
            jnp.asarray(q_len))
    want = xla.ragged_paged_attention(*args, causal=True)
    got = xla.ragged_paged_attention(*args, causal=True, native=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@native
def test_native_ragged_attention_refuses_a_page_outside_the_pool():
    rng = np.random.default_rng(3)
    q, k, v, table, _, q_start, q_len = _ragged_problem(rng, (1, 1), 4, 2, 8, 4, 3, True)
    table = table.at[1, 1].set(k.shape[1])  # read: sequence 1 has 8 keys, two pages
    with pytest.raises(Exception, match="page index out of range"):
        jax.block_until_ready(_native_ragged(q, k, v, table, np.array([3, 8], np.int32),
                                             q_start, q_len, causal=True, layer=0))
    with pytest.raises(Exception, match="query rows out of range"):
        jax.block_until_ready(_native_ragged(q, k, v, table, np.array([3, 8], np.int32),
                                             q_start + 3, q_len, causal=True, layer=0))
    assert not pa.supports(jnp.zeros((1, 4, 12)), jnp.zeros((1, 4, 2, 12)))  # D % 8
    # bf16 pools are read 16 values at a time; f16 ones not at all.
    assert pa.supports(jnp.zeros((1, 4, 16), jnp.bfloat16), jnp.zeros((1, 4, 2, 16), jnp.uint16))
    assert not pa.supports(jnp.zeros((1, 4, 8), jnp.bfloat16), jnp.zeros((1, 4, 2, 8), jnp.uint16))
    assert not pa.supports(jnp.zeros((1, 4, 16)), jnp.zeros((1, 4, 2, 16), jnp.float16))
