"""The jitted model step: `(params, kv, StepBatch arrays) -> (sampled tokens, kv)`.

The decoder layers run under `lax.scan` over stacked per-layer parameters, so XLA compiles one
layer body per step shape instead of every layer unrolled (on CPU a 30-layer model otherwise
costs a minute of compilation per shape). The KV pools are stacked too, `[L, N, page, Hkv, D]`,
carried through the scan and donated, so pages are updated in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batchjax.attention import xla
from batchjax.engine import sampling
from batchjax.engine.step_batch import StepBatch


def _attention_impl(name: str):
    if name == "xla":
        return xla.shared_prefix_paged_attention
    if name == "pallas":
        from batchjax.attention import pallas  # imported lazily: only this path needs Pallas

        return pallas.shared_prefix_paged_attention
    raise ValueError(f"unknown attention implementation {name!r}; choose 'xla' or 'pallas'")


def _stack_states(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class ModelStep:
    """Runs one StepBatch through the model and samples the requested rows."""

    def __init__(self, model: nnx.Module, attention: str = "xla"):
        config = model.config
        self.config = config
        layers = []
        for layer in model.layers:
            # The step's own module tree (sharing the caller's arrays, not copying them) with
            # q/k/v and gate/up fused, one matmul each; the caller's model keeps the HF layout.
            layer = nnx.merge(*nnx.split(layer))
            layer.fuse_projections()
            layers.append(layer)
        self._layer_graphdef, _ = nnx.split(layers[0])
        self._embed_graphdef, embed_state = nnx.split(model.embed_tokens)
        self._norm_graphdef, norm_state = nnx.split(model.norm)
        self._head_graphdef = None
        params = {
            "layers": _stack_states([nnx.split(layer)[1] for layer in layers]),
            "embed": embed_state,
            "norm": norm_state,
        }
        if model.lm_head is not None:
            self._head_graphdef, params["lm_head"] = nnx.split(model.lm_head)
        self.params = params
        self.dtype = model.dtype
        self._inv_freq = np.asarray(config.rope_inv_freq(), np.float32)  # [D/2]
        impl = _attention_impl(attention)

        def step(params, kv, token_ids, positions, logits_index, md, sampling_rows, greedy):
            logits, kv = self._forward(params, kv, token_ids, positions, logits_index, md, impl)
            if greedy:
                tokens = sampling.greedy_tokens(logits)
            else:
                tokens = sampling.sample_tokens(logits, *sampling_rows)
            return tokens, kv

        self._jitted = jax.jit(step, donate_argnums=(1,), static_argnames=("greedy",))
        self.shapes_seen: set[tuple] = set()

    def _forward(self, params, kv, token_ids, positions, logits_index, md, impl):
        """token_ids, positions: [T]; logits_index: [S] -> logits [S, V] f32, stacked kv."""
        embed = nnx.merge(self._embed_graphdef, params["embed"])
        x = embed(token_ids)  # [T, hidden]
        angles = positions.astype(jnp.float32)[:, None] * self._inv_freq[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)  # [T, D]
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        attention = xla.make_stacked_paged_attention(md, impl)

        def body(carry, layer_params):
            x, kv = carry
            layer_state, layer_idx = layer_params
            layer = nnx.merge(self._layer_graphdef, layer_state)
            x, kv = layer(x, cos, sin, layer_idx, attention, kv)
            return (x, kv), None

        num_layers = self.config.num_layers
        (x, kv), _ = jax.lax.scan(
            body, (x, kv), (params["layers"], jnp.arange(num_layers, dtype=jnp.int32)))
        x = x[logits_index]  # only sampled rows need the vocabulary-wide projection
        x = nnx.merge(self._norm_graphdef, params["norm"])(x)
        if self._head_graphdef is None:
            logits = x @ embed.embedding[...].T
        else:
            logits = nnx.merge(self._head_graphdef, params["lm_head"])(x)
        return logits.astype(jnp.float32), kv

    @property
    def num_compiled_shapes(self) -> int:
        return len(self.shapes_seen)

    def __call__(self, kv, batch: StepBatch, sampling_rows: tuple[np.ndarray, ...],
                 greedy: bool):
        self.shapes_seen.add((batch.shape_key, greedy))
        md = jax.tree.map(jnp.asarray, batch.metadata)
        tokens, kv = self._jitted(
            self.params, kv, batch.token_ids, batch.positions, batch.logits_index, md,
            sampling_rows, greedy=greedy,
        )
        return np.asarray(tokens), kv

    def jit_cache_size(self) -> int:
        """Programs XLA actually compiled for this step (checks `num_compiled_shapes`)."""
        return self._jitted._cache_size()
