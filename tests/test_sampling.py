"""Sampling: filters against a numpy reference, batch invariance, and the sampled distribution."""

import jax.numpy as jnp
import numpy as np
import pytest

from batchjax.engine.sampling import filter_logits, greedy_tokens, sample_tokens


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                    min_p: float) -> np.ndarray:
    """The kept token set of one row, each filter applied in turn to the renormalised survivors."""
    scaled = logits.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    order = np.argsort(-scaled, kind="stable")
    kept = np.ones(len(scaled), bool)
    if top_k > 0:
        kept[order[top_k:]] = False
    if top_p < 1.0:
        probs = np.where(kept, _softmax(np.where(kept, scaled, -np.inf)), 0.0)
        mass = 0.0
        for token in order:
            if not kept[token]:
                continue
            if mass >= top_p:
                kept[token] = False
            mass += probs[token]
    probs = np.where(kept, _softmax(np.where(kept, scaled, -np.inf)), 0.0)
    kept &= probs >= min_p * probs.max()
    # Tokens tied with the lowest kept value stay too.
    return scaled >= scaled[kept].min()


def _run_filter(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    rows = logits.shape[0]
    out = filter_logits(jnp.asarray(logits, jnp.float32),
                        jnp.full((rows,), temperature, jnp.float32),
                        jnp.full((rows,), top_k, jnp.int32),
                        jnp.full((rows,), top_p, jnp.float32),
                        jnp.full((rows,), min_p, jnp.float32))
    return np.isfinite(np.asarray(out))


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, 5, 1.0, 0.0),  # top-k alone
        (0.7, 0, 0.8, 0.0),  # top-p alone
        (1.3, 0, 1.0, 0.2),  # min-p alone
        (1.0, 20, 0.6, 0.0),  # top-p renormalised after top-k
        (0.5, 10, 0.9, 0.05),  # all three
        (1.0, 0, 1.0, 0.0),  # no filter keeps everything
        (1.0, 1000, 0.3, 0.0),  # k larger than the vocabulary
    ],
)
def test_filters_keep_the_same_tokens_as_the_numpy_reference(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(16, 64)).astype(np.float32)
    kept = _run_filter(logits, temperature, top_k, top_p, min_p)
    for row in range(logits.shape[0]):
        expected = _reference_kept(logits[row], temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(kept[row], expected, err_msg=f"row {row}")


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2: p = 0.5 needs one token, p = 0.51 needs two, p = 0.8 two.
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 3, np.float32))
    out = filter_logits(jnp.asarray(logits), jnp.ones(3), jnp.zeros(3, jnp.int32),
                        jnp.array([0.5, 0.51, 0.8]), jnp.zeros(3))
    assert np.isfinite(np.asarray(out)).sum(axis=-1).tolist() == [1, 2, 2]


def test_temperature_zero_rows_are_greedy_and_greedy_tokens_agrees():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(8, 100)), jnp.float32)
    rows = logits.shape[0]
    tokens = sample_tokens(logits, jnp.zeros(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows),
                           jnp.zeros(rows), jnp.arange(rows, dtype=jnp.uint32),
                           jnp.zeros(rows, jnp.int32), jnp.arange(rows, dtype=jnp.int32))
    expected = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    np.testing.assert_array_equal(np.asarray(greedy_tokens(logits)), expected)
    assert tokens.dtype == jnp.int32


def test_a_row_samples_the_same_token_in_any_batch():
    rng = np.random.default_rng(2)
    vocab = 50
    row = rng.normal(size=(vocab,)).astype(np.float32)
    # The same request (seed 7, position 13) inside a batch of 3 and a batch of 9, at different slots.
    small = rng.normal(size=(3, vocab)).astype(np.float32)
    large = rng.normal(size=(9, vocab)).astype(np.float32)
    small[1], large[6] = row, row

    def sample(logits: np.ndarray, slot: int) -> int:
        rows = logits.shape[0]
        seeds = rng.integers(0, 2**31, size=rows).astype(np.uint32)
        positions = rng.integers(0, 4096, size=rows).astype(np.int32)
        temperature = rng.uniform(0.0, 2.0, size=rows).astype(np.float32)
        seeds[slot], positions[slot], temperature[slot] = 7, 13, 1.0
        out = sample_tokens(jnp.asarray(logits), jnp.asarray(temperature),
                            jnp.zeros(rows, jnp.int32), jnp.full(rows, 0.95), jnp.full(rows, 0.01),
                            jnp.asarray(seeds), jnp.zeros(rows, jnp.int32),
                            jnp.asarray(positions))
        return int(out[slot])

    draws_small = [sample(small, 1) for _ in range(3)]
    draws_large = [sample(large, 6) for _ in range(3)]
    assert len(set(draws_small + draws_large)) == 1


def test_different_positions_and_seeds_draw_differently():
    rows, vocab = 64, 32
    logits = jnp.zeros((rows, vocab))  # uniform: identical draws everywhere would be a bug
    same_seed = sample_tokens(logits, jnp.ones(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows),
                              jnp.zeros(rows), jnp.zeros(rows, jnp.uint32),
                              jnp.zeros(rows, jnp.int32), jnp.arange(rows, dtype=jnp.int32))
    same_position = sample_tokens(logits, jnp.ones(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows),
                                  jnp.zeros(rows), jnp.arange(rows, dtype=jnp.uint32),
                                  jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32))
    same_sample_slot = sample_tokens(logits, jnp.ones(rows), jnp.zeros(rows, jnp.int32),
                                     jnp.ones(rows), jnp.zeros(rows), jnp.zeros(rows, jnp.uint32),
                                     jnp.arange(rows, dtype=jnp.int32), jnp.zeros(rows, jnp.int32))
    assert len(set(np.asarray(same_seed).tolist())) > 10
    assert len(set(np.asarray(same_position).tolist())) > 10
    # The samples of one prompt (same seed, same position) draw independently.
    assert len(set(np.asarray(same_sample_slot).tolist())) > 10


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (4, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.15)])
def test_empirical_frequencies_approach_the_filtered_softmax(top_k, top_p, min_p):
    vocab, draws, temperature = 8, 20_000, 0.8
    base = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    logits = jnp.broadcast_to(jnp.asarray(base), (draws, vocab))
    tokens = sample_tokens(logits, jnp.full(draws, temperature), jnp.full(draws, top_k, jnp.int32),
                           jnp.full(draws, top_p), jnp.full(draws, min_p),
                           jnp.full(draws, 1234, jnp.uint32), jnp.zeros(draws, jnp.int32),
                           jnp.arange(draws, dtype=jnp.int32))
    freq = np.bincount(np.asarray(tokens), minlength=vocab) / draws
    kept = _reference_kept(base, temperature, top_k, top_p, min_p)
    expected = np.where(kept, _softmax(np.where(kept, base / temperature, -np.inf)), 0.0)
    assert np.all(freq[~kept] == 0)
    np.testing.assert_allclose(freq, expected, atol=0.015)
