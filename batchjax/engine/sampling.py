"""Next-token sampling for a step: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Every function works row by row on static shapes and is jitted. A row's random draw is keyed
only by (seed, sample index, position), so a request samples the same token whatever else is in its batch,
and a recomputed request (after preemption) samples what it sampled before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def greedy_tokens(logits: jax.Array) -> jax.Array:
    """logits: [S, V] -> [S] int32, the most likely token (lowest id on ties)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.jit
def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """The distribution each sampled row draws from, as logits with dropped tokens at -inf.

    logits: [S, V] f32; temperature, top_p, min_p: [S] f32; top_k: [S] int32 -> [S, V] f32.
    After dividing by temperature (rows with temperature 0 are scaled by 1; they are greedy),
    filters apply in the order top-k (the k most likely; 0 = off), top-p (the smallest set of
    most likely tokens whose mass, renormalised after top-k, reaches p) and min-p (tokens with
    probability >= min_p * the largest). Each filter keeps a prefix of the tokens sorted by
    probability, so their intersection is the first `n_keep`; a token tied with the last kept
    one is kept too, which makes the result independent of token order.
    """
    vocab = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [S, V]
    ranks = jnp.arange(vocab, dtype=jnp.int32)[None, :]  # [1, V]

    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [S]
    in_top_k = ranks < k[:, None]
    probs_after_k = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_after_k, axis=-1) - probs_after_k  # exclusive cumsum
    # p = 1 keeps everything; rounding in the cumsum must not drop the tail.
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    n_top_p = jnp.sum(in_top_p & in_top_k, axis=-1)

    # min-p compares ratios to the top probability, which renormalising does not change.
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    n_min_p = jnp.sum(probs >= min_p[:, None] * probs[:, :1], axis=-1)

    n_keep = jnp.maximum(jnp.minimum(jnp.minimum(k, n_top_p), n_min_p), 1)  # [S]
    cutoff = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)  # [S, 1]
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def _draw(filtered_row: jax.Array, seed: jax.Array, sample: jax.Array,
          position: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), sample), position)
    return jax.random.categorical(key, filtered_row)


def draw_tokens(logits: jax.Array, filtered: jax.Array, temperature: jax.Array,
                seeds: jax.Array, samples: jax.Array, positions: jax.Array) -> jax.Array:
    """One token per row from `filtered` (`filter_logits`), argmax of `logits` where the
    temperature is 0. Traced inside a caller's jit."""
    drawn = jax.vmap(_draw)(filtered, seeds.astype(jnp.uint32), samples.astype(jnp.int32),
                            positions.astype(jnp.int32))
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@jax.jit
def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array, seeds: jax.Array, samples: jax.Array,
                  positions: jax.Array) -> jax.Array:
    """One token per row. logits: [S, V]; the rest [S] -> [S] int32.

    seeds: [S] uint32 or int32, the request's seed; samples: [S] int32, which of the
    request's `n` samples the row draws for; positions: [S] int32, the index the new token
    takes in its sequence (prompt length + tokens generated before it). Rows with
    temperature 0 take the argmax. Padding rows may hold any values; their tokens are ignored.
    """
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
    return draw_tokens(logits, filtered, temperature, seeds, samples, positions)


def token_logprobs(logprobs: jax.Array, targets: jax.Array, k: int) -> dict[str, jax.Array]:
    """What a step reports of each row's distribution: logprobs [R, V] f32 (log-softmax),
    targets [R] int32 -> {"target": [R] logprob of the target token, "top_ids" / "top":
    [R, k] the k most likely tokens and their logprobs, most likely first}. Only these leave
    the device, never the [R, V] rows."""
    target = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    top, top_ids = jax.lax.top_k(logprobs, k)
    return {"target": target, "top": top, "top_ids": top_ids.astype(jnp.int32)}


def sampling_row_arrays(num_rows: int, params=(), positions=None, samples=()) -> tuple:
    """Host arrays of the sampled rows' settings, `[Ss]` each: temperature, top_k, top_p,
    min_p, seed, sample index, position. `params`: the `SamplingParams` of the first rows, in
    order (the rest are padding: greedy); `samples`: their sample indices (default 0)."""
    temperature = np.zeros(num_rows, np.float32)
    top_k = np.zeros(num_rows, np.int32)
    top_p = np.ones(num_rows, np.float32)
    min_p = np.zeros(num_rows, np.float32)
    seeds = np.zeros(num_rows, np.uint32)
    sample = np.zeros(num_rows, np.int32)
    for i, s in enumerate(params):
        temperature[i], top_k[i], top_p[i], min_p[i], seeds[i] = (
            s.temperature, s.top_k, s.top_p, s.min_p, s.seed)
    sample[: len(samples)] = samples
    if positions is None:
        positions = np.zeros(num_rows, np.int32)
    return temperature, top_k, top_p, min_p, seeds, sample, positions
