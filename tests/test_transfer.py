"""A step's host arrays cross to the device as one buffer, and come out of it unchanged."""

import jax
import jax.numpy as jnp
import numpy as np

from batchjax.attention.metadata import PagedAttentionMetadata
from batchjax.engine import step as step_module
from batchjax.engine import transfer
from batchjax.engine.engine import Engine


def _step_like_trees(rng):
    md = PagedAttentionMetadata(*(rng.integers(-5, 99, size=s).astype(np.int32) for s in
                                  ((8,), (8, 3), (8,), (8,), (8,), (2, 8, 4), (2, 8), (2, 8),
                                   (2, 8))))
    forward = (rng.integers(0, 50, 8).astype(np.int32), np.arange(8, dtype=np.int32), md,
               (np.int32(5), np.int32(2)))
    sampling = ((rng.random(4).astype(np.float32), np.full(4, 2**32 - 3, np.uint32),
                 np.array([-0.0, np.inf, np.nan, 1e-38], np.float32)),
                {"processed": np.array([True, False, True, False]),
                 "bitmask": rng.integers(-2**31, 2**31 - 1, size=(4, 3)).astype(np.int32)})
    return forward, sampling


def test_packed_trees_unpack_to_the_same_arrays_bit_for_bit():
    trees = _step_like_trees(np.random.default_rng(0))
    flat, layouts = transfer.pack(*trees)
    assert flat.dtype == np.int32 and flat.ndim == 1
    assert flat.size == sum(layout.size for layout in layouts)
    got = jax.jit(lambda f: transfer.unpack(f, layouts))(jnp.asarray(flat))
    want_leaves, want_def = jax.tree.flatten(trees)
    got_leaves, got_def = jax.tree.flatten(jax.tree.map(np.asarray, got))
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves):
        w = np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        # Bits, not values: NaN, -0.0 and the largest uint32 must survive the round trip.
        assert g.tobytes() == w.tobytes()


def test_layouts_tell_apart_steps_that_differ_in_a_shape_or_dtype():
    forward, sampling = _step_like_trees(np.random.default_rng(1))
    _, layouts = transfer.pack(forward, sampling)
    wider = ((forward[0].astype(np.float32),) + forward[1:], sampling)
    assert transfer.pack(*wider)[1] != layouts
    assert transfer.pack(forward, sampling)[1] == layouts  # hashable and equal: one program


def test_every_step_sends_its_inputs_in_one_transfer(tiny_llama_dir, monkeypatch):
    engine = Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                    progress=False)
    requests = [{"id": f"r{i}", "prompt_token_ids": list(range(3, 12 + i)), "max_tokens": 4}
                for i in range(3)]
    want = [r.token_ids for r in engine.generate(requests)]
    sent = []
    place = step_module._place
    monkeypatch.setattr(step_module, "_place",
                        lambda tree, *a: sent.append(jax.tree.leaves(tree)) or place(tree, *a))
    got = [r.token_ids for r in engine.generate(requests)]
    assert got == want
    steps = engine.last_metrics["prefill_steps"] + engine.last_metrics["decode_steps"]
    # One buffer per step, plus the first step's empty feed.
    assert len(sent) == steps + 1
    assert all(len(leaves) == 1 for leaves in sent)
