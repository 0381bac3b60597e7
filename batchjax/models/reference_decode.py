"""Greedy decoding without a cache: every step recomputes every sequence from its first token.

Slow and plainly correct, so it is the oracle the paged engine is compared with. All sequences
share one flat batch of fixed size (prompt + max_new_tokens slots each), so the step compiles
once; the model is split once and the jitted function merges it inside, as the engine does.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batchjax.attention.dense import dense_causal_attention
from batchjax.models.llama import LlamaForCausalLM


def greedy_decode(
    model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """The `max_new_tokens` argmax continuations of each prompt (no stop tokens)."""
    capacity = np.array([len(p) + max_new_tokens for p in prompts])
    starts = np.concatenate([[0], np.cumsum(capacity)[:-1]])
    # Each sequence owns a run of slots: segment = its index, positions 0..capacity-1. Slots not
    # yet generated sit after the real tokens, so causal masking keeps them out of real rows.
    segment_ids = jnp.asarray(np.repeat(np.arange(len(prompts)), capacity), jnp.int32)  # [T]
    positions = jnp.asarray(np.concatenate([np.arange(c) for c in capacity]), jnp.int32)  # [T]
    tokens = np.zeros(int(capacity.sum()), np.int32)  # [T]
    for start, prompt in zip(starts, prompts):
        tokens[start : start + len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts])
    graphdef, state = nnx.split(model)
    num_layers = len(model.layers)

    @jax.jit
    def next_tokens(state, tokens: jax.Array, last_index: jax.Array) -> jax.Array:
        step_model = nnx.merge(graphdef, state)
        attention = dense_causal_attention(segment_ids, positions)
        logits, _ = step_model(
            tokens, positions, (None,) * num_layers, attention, logits_index=last_index
        )
        return jnp.argmax(logits, axis=-1)  # [S]

    for _ in range(max_new_tokens):
        chosen = np.asarray(next_tokens(state, tokens, jnp.asarray(starts + lengths - 1)))
        tokens[starts + lengths] = chosen
        lengths += 1
    return [
        tokens[start + len(prompt) : start + len(prompt) + max_new_tokens].tolist()
        for start, prompt in zip(starts, prompts)
    ]
