"""The native CPU matmul computes `x @ W[layer]` exactly as the plain jnp product does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from batchjax.engine import step as step_module
from batchjax.kernels import packed_matmul as pm

HAS_CPU = pm._cpu_has_avx2_fma()
native = pytest.mark.skipif(not HAS_CPU, reason="the native matmul needs x86-64 AVX2 and FMA")


def test_pack_round_trips_and_lays_columns_out_in_panels():
    w = np.arange(3 * 5 * 48, dtype=np.float32).reshape(3, 5, 48)
    wp = pm.pack(w)
    assert wp.shape == (3, 3, 5, 16)
    np.testing.assert_array_equal(wp[1, 2, 4], w[1, 4, 32:48])  # panel 2 = columns 32..47
    np.testing.assert_array_equal(pm.unpack(wp), w)
    with pytest.raises(ValueError, match="divisible by 16"):
        pm.pack(np.zeros((4, 40), np.float32))


@native
def test_the_kernel_builds_on_a_cpu_that_can_run_it():
    # Where the CPU qualifies, a failed build is a bug, not a reason to skip.
    assert pm.unavailable_reason() is None


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
    with pytest.raises(TypeError, match="f32 only"):
        pm.packed_matmul(jnp.ones((2, 8), jnp.bfloat16), wp, 0)


def test_turning_the_kernel_off_is_reported(monkeypatch):
    monkeypatch.setenv("BATCHJAX_NATIVE_MATMUL", "0")
    pm._load.cache_clear()
    try:
        assert "BATCHJAX_NATIVE_MATMUL=0" in pm.unavailable_reason()
        assert step_module.choose_matmul("auto", jnp.float32) == "xla"
        with pytest.raises(ValueError, match="cannot run here"):
            step_module.choose_matmul("native", jnp.float32)
    finally:
        monkeypatch.undo()
        pm._load.cache_clear()


def test_choose_matmul_keeps_xla_where_the_kernel_does_not_apply():
    assert step_module.choose_matmul("xla", jnp.float32) == "xla"
    assert step_module.choose_matmul("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="float32 only"):
        step_module.choose_matmul("native", jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown matmul"):
        step_module.choose_matmul("fast", jnp.float32)
    want = "native" if HAS_CPU else "xla"
    assert step_module.choose_matmul("auto", jnp.float32) == want


@native
def test_model_step_packs_every_dense_kernel_and_leaves_placeholders(tiny_llama_dir):
    from batchjax.models.registry import load_model

    model = load_model(str(tiny_llama_dir)).model
    step = step_module.ModelStep(model, matmul="native")
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
