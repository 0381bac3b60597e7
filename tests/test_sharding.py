"""Meshes, sharding rules and the tensor-parallel layout, on the host alone (no devices)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from batchjax.models.config import ModelConfig
from batchjax.sharding import rules
from batchjax.sharding.mesh import MeshError, make_mesh
from batchjax.sharding.tensor_parallel import Layout, ShardingError, workable_sizes

SMOLLM2 = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                      intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                      head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dataclasses.replace(SMOLLM2, vocab_size=100, hidden_size=64, intermediate_size=128,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_heads_that_do_not_divide_fail_with_the_sizes_that_work():
    with pytest.raises(ShardingError) as e:
        Layout.for_model(SMOLLM2, 2)
    msg = str(e.value)
    assert "9 query heads" in msg and "3 KV heads" in msg and msg.endswith("Sizes that work: 1, 3")
    assert workable_sizes(SMOLLM2) == [1, 3]  # 9 heads, but 1,536 MLP columns
    with pytest.raises(ShardingError, match="KV heads"):
        Layout.for_model(dataclasses.replace(TINY, num_heads=12, num_kv_heads=4,
                                             intermediate_size=96), 3)


def test_more_devices_than_kv_heads_replicate_them_onto_the_devices_that_read_them():
    layout = Layout.for_model(TINY, 4)  # 4 query heads, 2 KV heads
    assert layout.kv_replicated and layout.local_kv_heads == 1 and layout.pool_kv_heads == 4
    # Device d's query head d reads KV head d // 2 (GQA groups of 2).
    d = TINY.head_dim
    cols = layout.qkv_columns().reshape(4, 3, d)  # per device: its q, k and v head
    nq, nk = TINY.num_heads * d, TINY.num_kv_heads * d
    for dev in range(4):
        assert cols[dev, 0, 0] == dev * d
        assert cols[dev, 1, 0] == nq + (dev // 2) * d
        assert cols[dev, 2, 0] == nq + nk + (dev // 2) * d


@pytest.mark.parametrize("t", [1, 2])
def test_the_fused_layout_gives_each_device_its_own_heads(t):
    layout = Layout.for_model(TINY, t)
    rng = np.random.default_rng(0)
    h, d = TINY.hidden_size, TINY.head_dim
    q = rng.normal(size=(h, TINY.num_heads * d)).astype(np.float32)
    k = rng.normal(size=(h, TINY.num_kv_heads * d)).astype(np.float32)
    v = rng.normal(size=(h, TINY.num_kv_heads * d)).astype(np.float32)
    fused = np.asarray(layout.fuse_qkv(q, k, v))
    blocks = np.split(fused, t, axis=1)  # what the sharding gives each device
    hq, hk = layout.local_heads * d, layout.local_kv_heads * d
    for dev, block in enumerate(blocks):
        np.testing.assert_array_equal(block[:, :hq], q[:, dev * hq:(dev + 1) * hq])
        np.testing.assert_array_equal(block[:, hq:hq + hk], k[:, dev * hk:(dev + 1) * hk])
        np.testing.assert_array_equal(block[:, hq + hk:], v[:, dev * hk:(dev + 1) * hk])
    gate = rng.normal(size=(h, TINY.intermediate_size)).astype(np.float32)
    up = rng.normal(size=(h, TINY.intermediate_size)).astype(np.float32)
    for dev, block in enumerate(np.split(np.asarray(layout.fuse_gate_up(gate, up)), t, axis=1)):
        n = layout.local_intermediate
        np.testing.assert_array_equal(block[:, :n], gate[:, dev * n:(dev + 1) * n])
        np.testing.assert_array_equal(block[:, n:], up[:, dev * n:(dev + 1) * n])


def test_the_padded_vocabulary_splits_into_whole_panels():
    layout = Layout.for_model(SMOLLM2, 3)
    assert layout.padded_vocab == 49152 and layout.padded_vocab % (3 * 16) == 0
    odd = Layout.for_model(dataclasses.replace(TINY, vocab_size=100), 2)
    head = np.ones((TINY.hidden_size, 100))
    padded = np.asarray(odd.pad_vocab(head))
    assert padded.shape == (TINY.hidden_size, 128) and not padded[:, 100:].any()


def test_rules_put_heads_mlp_vocab_and_kv_heads_on_the_model_axis():
    spec = rules.param_spec
    assert tuple(spec(("layers", "self_attn", "qkv_proj", "kernel"), 3)) == (
        None, None, "model")
    assert tuple(spec(("layers", "self_attn", "o_proj", "kernel"), 3)) == (None, "model", None)
    assert tuple(spec(("layers", "mlp", "down_proj", "kernel"), 3)) == (None, "model", None)
    assert tuple(spec(("layers", "input_layernorm", "weight"), 2)) == (None, None)
    assert tuple(spec(("embed", "embedding"), 2)) == (None, None)
    assert tuple(spec(("head",), 2)) == (None, "model")
    # Packed panels [L, N/16, K, 16]: column-parallel over panels, row-parallel over rows.
    assert tuple(spec(("packed", "qkv_proj"), 4)) == (None, "model", None, None)
    assert tuple(spec(("packed", "o_proj"), 4)) == (None, None, "model", None)
    assert tuple(spec(("packed", "lm_head"), 4)) == (None, "model", None, None)
    assert tuple(rules.kv_spec()) == (None, None, None, "model", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        spec(("layers", "mlp", "mystery", "kernel"), 3)


@pytest.mark.parametrize("table", rules.EMBED_PLACEMENTS)
@pytest.mark.parametrize("head", rules.HEAD_PLACEMENTS)
def test_each_placement_puts_its_axis_of_the_table_and_head_on_the_model_axis(table, head):
    placed = rules.placement_rules(table, head)
    assert rules.placement(placed) == (table, head)
    assert rules.parse_placement(f"{table}/{head}") == (table, head)

    def spec(path, ndim):
        return tuple(rules.param_spec(path, ndim, rules=placed))

    assert spec(("embed", "embedding"), 2) == {
        "replicated": (None, None), "vocab": ("model", None), "embed": (None, "model")}[table]
    assert spec(("head",), 2) == {"vocab": (None, "model"), "embed": ("model", None)}[head]
    # The packed head [1, N/16, K, 16]: vocabulary columns over panels, hidden rows over rows.
    assert spec(("packed", "lm_head"), 4) == {
        "vocab": (None, "model", None, None), "embed": (None, None, "model", None)}[head]
    # Nothing else moves: the residual stream's hidden axis stays whole on every device.
    assert spec(("norm", "weight"), 1) == (None,)
    assert spec(("layers", "self_attn", "qkv_proj", "kernel"), 3) == (None, None, "model")
    assert spec(("layers", "mlp", "down_proj", "kernel"), 3) == (None, "model", None)
    assert tuple(rules.kv_spec(placed)) == (None, None, None, "model", None)
    assert rules.placement() == rules.DEFAULT_PLACEMENT


def test_placements_that_cannot_be_run_are_refused():
    with pytest.raises(ValueError, match="TABLE/HEAD"):
        rules.parse_placement("vocab")
    with pytest.raises(ValueError, match="TABLE/HEAD"):
        rules.parse_placement("replicated/replicated")  # the head is always split
    with pytest.raises(ValueError, match="one axis at a time"):
        rules.placement(dict(rules.RULES, embed_vocab="model", embed_hidden="model"))
    with pytest.raises(ValueError, match="one axis at a time"):
        rules.placement(dict(rules.RULES, head_vocab="data", head_hidden=None))
    with pytest.raises(ValueError, match="no axis of the LM head"):
        rules.placement(rules.TENSOR_PARALLEL)


def test_a_split_vocabulary_or_hidden_axis_is_padded_with_zeros():
    layout = Layout.for_model(dataclasses.replace(TINY, num_heads=3, num_kv_heads=1,
                                                  intermediate_size=96), 3)
    assert layout.padded_vocab == 144 and layout.padded_hidden == 66
    table = np.ones((100, TINY.hidden_size))
    rows = np.asarray(layout.pad_vocab(table, axis=0))
    assert rows.shape == (144, 64) and not rows[100:].any() and rows[:100].all()
    cols = np.asarray(layout.pad_hidden(table, axis=1))
    assert cols.shape == (100, 66) and not cols[:, 64:].any()
    head = np.asarray(layout.pad_hidden(layout.pad_vocab(table.T), axis=0))
    assert head.shape == (66, 144) and head[:64, :100].all() and head.sum() == 6400


@pytest.mark.parametrize("layout", ["pairs", "widen"])
def test_a_row_parallel_packed_head_splits_into_each_devices_rows(layout):
    """Cutting packed panels [1, N/16, K (K/2 pairs), ...] over their rows gives each device
    the panels of its own rows of the head, as an LM head placed over `embed` needs."""
    import jax.numpy as jnp

    from batchjax.kernels import packed_matmul

    t, k, n = 3, 66, 48
    head = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    panels = np.asarray(packed_matmul.pack(jnp.asarray(head, jnp.bfloat16)[None], layout))
    for dev, block in enumerate(np.split(panels, t, axis=2)):
        np.testing.assert_array_equal(
            np.asarray(packed_matmul.unpack(jnp.asarray(block)), np.float32)[0],
            np.asarray(jnp.asarray(head, jnp.bfloat16), np.float32)[dev * 22:(dev + 1) * 22])


def test_a_mesh_larger_than_the_devices_fails_before_anything_loads():
    with pytest.raises(MeshError, match=r"tensor_parallel=64 x data_parallel=2 needs 128"):
        make_mesh(64, 2)
    with pytest.raises(MeshError, match="positive"):
        make_mesh(0, 1)
    mesh = make_mesh()
    assert mesh.devices.shape == (1, 1) and mesh.axis_names == ("data", "model")


def test_an_engine_refuses_an_unknown_placement_before_loading_anything():
    from batchjax.engine.engine import Engine

    with pytest.raises(ValueError, match="TABLE/HEAD with TABLE one of replicated, vocab, embed"):
        Engine("no-such-model-is-loaded", placement="rows/vocab")
