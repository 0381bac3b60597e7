"""The jitted model step: `(params, kv, StepBatch arrays) -> (sampled tokens, kv)`.

The decoder layers run under `lax.scan` over stacked per-layer parameters, so XLA compiles one
layer body per step shape instead of every layer unrolled (on CPU a 30-layer model otherwise
costs a minute of compilation per shape). The KV pools are stacked too, `[L, N, page, Hkv, D]`,
carried through the scan and donated, so pages are updated in place.

On x86-64 CPUs (`cpu_kernels="auto"`) two parts run through native kernels where they can
(`batchjax.kernels`): the dense products (fused q/k/v, o, fused gate/up, down, and the
vocabulary head), for which the step keeps those weights packed, all layers in one array, and
passes the layer index; and, on the `xla` attention path, the ragged paged attention.

Programs are compiled ahead of time, one per `StepShape` (`warm_up`), and called directly: a
call returns device arrays at once, so the host plans the next step while this one runs. The
next step reads this one's sampled tokens from its `feed` on the device.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from batchjax.attention import xla
from batchjax.engine import sampling
from batchjax.engine.sampling import sampling_row_arrays
from batchjax.engine.step_batch import StepBatch, empty_step_batch
from batchjax.kernels import native, packed_matmul

_PACKABLE = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
             ("mlp", "down_proj"))
CPU_KERNELS = ("auto", "native", "xla")


def _attention_impl(name: str):
    if name == "xla":
        return xla.shared_prefix_paged_attention
    if name == "pallas":
        from batchjax.attention import pallas  # imported lazily: only this path needs Pallas

        return pallas.shared_prefix_paged_attention
    raise ValueError(f"unknown attention implementation {name!r}; choose 'xla' or 'pallas'")


def choose_cpu_kernels(name: str, dtype) -> str:
    """'native' or 'xla' for requested `cpu_kernels` ('auto': native wherever it can run)."""
    if name not in CPU_KERNELS:
        raise ValueError(
            f"unknown cpu_kernels {name!r}; choose one of {', '.join(CPU_KERNELS)}")
    if name == "xla":
        return "xla"
    if jax.default_backend() != "cpu":
        reason = f"the native kernels are for CPUs, not {jax.default_backend()}"
    elif jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        reason = f"the native kernels are for float32 and bfloat16, not {jnp.dtype(dtype).name}"
    else:
        reason = native.unavailable_reason()
    if reason is None:
        return "native"
    if name == "native":
        raise ValueError(f"cpu_kernels='native' cannot run here: {reason}")
    return "xla"


def _stack_states(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class ModelStep:
    """Runs one StepBatch through the model and samples the requested rows."""

    def __init__(self, model: nnx.Module, attention: str = "xla", cpu_kernels: str = "auto"):
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
        self.cpu_kernels = choose_cpu_kernels(cpu_kernels, model.dtype)
        layer_states = [nnx.split(layer)[1] for layer in layers]
        params = {"embed": embed_state, "norm": norm_state, "packed": {}}
        if model.lm_head is not None:
            self._head_graphdef, params["lm_head"] = nnx.split(model.lm_head)
        if self.cpu_kernels == "native":
            self._pack(params, layer_states, model)
        # Which native product the bf16 weights run on (None: XLA's dot, or f32 weights).
        self.bf16_matmul = None
        if self.cpu_kernels == "native" and jnp.dtype(model.dtype) == jnp.bfloat16:
            shapes = [w.shape[-1] for w in params["packed"].values()]
            if 2 * packed_matmul.PANEL not in shapes:
                self.bf16_matmul = "avx2_fma"
            else:
                self.bf16_matmul = "amx_bf16" if native.cpu_has_amx_bf16() else "avx512_bf16"
        params["layers"] = _stack_states(layer_states)
        self.params = params
        self.dtype = model.dtype
        self._inv_freq = np.asarray(config.rope_inv_freq(), np.float32)  # [D/2]
        impl = _attention_impl(attention)
        if attention == "xla" and self.cpu_kernels == "native":
            impl = functools.partial(impl, native=True)

        def step(params, kv, feed, token_ids, positions, logits_index, md, real_rows,
                 sampling_rows, greedy):
            # An input still being sampled by the step before is a placeholder: its real id
            # is in that step's feed, read here without a round trip through the host.
            from_feed = feed[jnp.clip(-token_ids - 1, 0, feed.shape[0] - 1)]
            token_ids = jnp.where(token_ids < 0, from_feed, token_ids)
            logits, kv = self._forward(params, kv, token_ids, positions, logits_index, md, impl,
                                       real_rows)
            if greedy:
                tokens = sampling.greedy_tokens(logits)
            else:
                tokens = sampling.sample_tokens(logits, *sampling_rows)
            feed = jnp.zeros_like(feed).at[: tokens.shape[0]].set(tokens)
            return tokens, feed, kv

        self._jitted = jax.jit(step, donate_argnums=(1,), static_argnames=("greedy",))
        self._compiled: dict[tuple, Any] = {}  # (StepShape, greedy) -> compiled program

    @staticmethod
    def _pack(params, layer_states, model) -> None:
        """Moves the dense kernels into `params["packed"]`, packed for the native matmul.

        Each layer's copy becomes an empty placeholder, so the scan slices nothing for it; a
        kernel whose width is not a multiple of the panel stays where it is, on XLA's dot.
        """
        packed = params["packed"]
        preferred = packed_matmul.bf16_layout()  # AVX512-BF16 pairs where the CPU has them

        def pack(w):
            layout = preferred if w.shape[-2] % 2 == 0 else "widen"
            return packed_matmul.pack(w, layout)

        for module, name in _PACKABLE:
            kernels = [st[module][name]["kernel"] for st in layer_states]
            if kernels[0].shape[-1] % packed_matmul.PANEL:
                continue
            packed[name] = pack(jnp.stack([k[...] for k in kernels]))
            for st in layer_states:
                st[module][name]["kernel"] = nnx.Param(jnp.zeros((0,), model.dtype))
        if model.lm_head is None:
            head = model.embed_tokens.embedding[...].T  # tied: the lookup keeps [V, H] too
        else:
            head = params["lm_head"]["kernel"][...]
        if head.shape[-1] % packed_matmul.PANEL == 0:  # the head has no bias
            packed["lm_head"] = pack(head[None])
            params.pop("lm_head", None)

    def _forward(self, params, kv, token_ids, positions, logits_index, md, impl, real_rows):
        """token_ids, positions: [T]; logits_index: [S] -> logits [S, V] f32, stacked kv.

        real_rows: (real tokens, real sampled rows), int32 scalars; the native products skip
        the padding rows after them (XLA's dot computes them and the step ignores them).
        """
        num_tokens, num_sampled = real_rows
        embed = nnx.merge(self._embed_graphdef, params["embed"])
        x = embed(token_ids)  # [T, hidden]
        angles = positions.astype(jnp.float32)[:, None] * self._inv_freq[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)  # [T, D]
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        attention = xla.make_stacked_paged_attention(md, impl)

        packed = params["packed"]  # closed over, not scanned: every layer's panels in one array

        def body(carry, layer_params):
            x, kv = carry
            layer_state, layer_idx = layer_params
            layer = nnx.merge(self._layer_graphdef, layer_state)

            def matmul(name, h):
                if name not in packed:
                    return None
                return packed_matmul.packed_matmul(h, packed[name], layer_idx, num_tokens)

            x, kv = layer(x, cos, sin, layer_idx, attention, kv, matmul)
            return (x, kv), None

        num_layers = self.config.num_layers
        (x, kv), _ = jax.lax.scan(
            body, (x, kv), (params["layers"], jnp.arange(num_layers, dtype=jnp.int32)))
        x = x[logits_index]  # only sampled rows need the vocabulary-wide projection
        x = nnx.merge(self._norm_graphdef, params["norm"])(x)
        if "lm_head" in packed:
            logits = packed_matmul.packed_matmul(x, packed["lm_head"], 0, num_sampled)
        elif self._head_graphdef is None:
            logits = x @ embed.embedding[...].T
        else:
            logits = nnx.merge(self._head_graphdef, params["lm_head"])(x)
        return logits.astype(jnp.float32), kv

    @property
    def num_compiled_shapes(self) -> int:
        return len(self._compiled)

    @staticmethod
    def _inputs(batch: StepBatch, sampling_rows):
        """A step's host arrays, in the jitted step's order, sent to the device in one call."""
        real_rows = (np.int32(batch.num_tokens), np.int32(len(batch.sample_seq_ids)))
        return jax.device_put((batch.token_ids, batch.positions, batch.logits_index,
                               batch.metadata, real_rows, tuple(sampling_rows)))

    def _lower(self, kv, feed, inputs, greedy: bool):
        return self._jitted.lower(self.params, kv, feed, *inputs, greedy=greedy)

    @staticmethod
    def empty_feed(size: int) -> jax.Array:
        """The feed before a job's first step: `size` is the most rows a step samples."""
        return jnp.zeros(size, jnp.int32)

    def warm_up(self, kv, feed, shapes, greedy: bool, progress: bool = True) -> int:
        """Compiles every shape of `shapes` not compiled yet, before any step runs; returns how
        many it compiled. Programs are traced one by one and built in parallel threads (XLA
        compiles outside the GIL); the persistent cache makes a rerun's builds loads."""
        todo = [s for s in dict.fromkeys(shapes) if (s, greedy) not in self._compiled]
        if not todo:
            return 0
        bar = tqdm(total=len(todo), unit="shape", desc="compile", disable=not progress,
                   dynamic_ncols=True)
        threads = max(1, min(len(todo), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            futures = {}
            for shape in todo:
                inputs = self._inputs(empty_step_batch(shape), sampling_row_arrays(shape.sampled))
                futures[pool.submit(self._lower(kv, feed, inputs, greedy).compile)] = shape
            for future in concurrent.futures.as_completed(futures):
                self._compiled[(futures[future], greedy)] = future.result()
                bar.update(1)
        bar.close()
        return len(todo)

    def __call__(self, kv, feed, batch: StepBatch, sampling_rows: tuple[np.ndarray, ...],
                 greedy: bool):
        """Runs the step: returns (sampled tokens [Ss], feed, kv) as device arrays, without
        waiting for them. `feed` is the previous step's (or `empty_feed`)."""
        key = (batch.shape, greedy)
        inputs = self._inputs(batch, sampling_rows)
        program = self._compiled.get(key)
        if program is None:  # a shape warm-up did not foresee: compiled here, and counted
            program = self._compiled[key] = self._lower(kv, feed, inputs, greedy).compile()
        return program(self.params, kv, feed, *inputs)
