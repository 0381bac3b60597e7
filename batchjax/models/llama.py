"""The Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3) as one NNX module.

The model computes projections, norms, RoPE and the MLP for a flat batch of T tokens; attention
itself goes through an `AttentionFn` (see `batchjax.attention`), so the same module runs the
dense parity path and the engine's paged, shared-prefix path. Parameter names and layouts follow
HF transformers (`model.layers.N.self_attn.q_proj`, ...) except that linear kernels are stored
`[in, out]`, as `nnx.Linear` keeps them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from batchjax.attention import AttentionFn
from batchjax.models.config import ModelConfig


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 whatever the parameter dtype, then scale in x's dtype, as HF does.
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def _linear(n_in: int, n_out: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _concat_linears(linears: list[nnx.Linear]) -> nnx.Linear:
    """One linear whose outputs are the given linears' outputs side by side."""
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
    has_bias = linears[0].bias is not None
    fused = nnx.eval_shape(lambda: nnx.Linear(
        kernel.shape[0], kernel.shape[1], use_bias=has_bias, dtype=linears[0].dtype,
        param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
    fused.kernel.set_value(kernel)
    if has_bias:
        fused.bias.set_value(jnp.concatenate([lin.bias[...] for lin in linears]))
    return fused


def _project(module: nnx.Module, name: str, x: jax.Array, matmul) -> jax.Array:
    """`module.<name>(x)`, or through `matmul(name, x)` when the caller supplies the product.

    `matmul` returns None for kernels it does not hold; the engine uses it to run its packed
    native CPU kernel (see `batchjax.kernels.packed_matmul`) with the module's bias.
    """
    linear = getattr(module, name)
    y = None if matmul is None else matmul(name, x)
    if y is None:
        return linear(x)
    return y if linear.bias is None else y + linear.bias[...]


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x: [T, H, D]; cos, sin: [T, D] (HF's rotate-half layout, not interleaved pairs)
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = d
        self.q_proj = _linear(hidden, config.num_heads * d, config.attention_bias, dtype, rngs)
        self.k_proj = _linear(hidden, config.num_kv_heads * d, config.attention_bias, dtype, rngs)
        self.v_proj = _linear(hidden, config.num_kv_heads * d, config.attention_bias, dtype, rngs)
        self.o_proj = _linear(
            config.num_heads * d, hidden, config.attention_output_bias, dtype, rngs
        )
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = None
            self.k_norm = None
        self.qkv_proj = nnx.data(None)  # set by fuse_projections

    def fuse_projections(self) -> None:
        """q, k and v as one linear (see `LlamaForCausalLM.fuse_projections`)."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        self.q_proj = self.k_proj = self.v_proj = None

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        layer_idx: int,
        attention: AttentionFn,
        layer_kv,
        matmul=None,
    ):
        # x: [T, hidden]
        t = x.shape[0]
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            qkv = _project(self, "qkv_proj", x, matmul)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        out, layer_kv = attention(layer_idx, q, k, v, layer_kv)  # out: [T, Hq, D]
        out = out.reshape(t, self.num_heads * self.head_dim)
        return _project(self, "o_proj", out, matmul), layer_kv


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(hidden, inter, False, dtype, rngs)
        self.up_proj = _linear(hidden, inter, False, dtype, rngs)
        self.down_proj = _linear(inter, hidden, False, dtype, rngs)
        self.gate_up_proj = nnx.data(None)  # set by fuse_projections

    def fuse_projections(self) -> None:
        """gate and up as one linear (see `LlamaForCausalLM.fuse_projections`)."""
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        self.gate_proj = self.up_proj = None

    def __call__(self, x: jax.Array, matmul=None) -> jax.Array:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate_up = _project(self, "gate_up_proj", x, matmul)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        return _project(self, "down_proj", jax.nn.silu(gate) * up, matmul)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        self.mlp.fuse_projections()

    def __call__(self, x, cos, sin, layer_idx: int, attention: AttentionFn, layer_kv,
                 matmul=None):
        h, layer_kv = self.self_attn(
            self.input_layernorm(x), cos, sin, layer_idx, attention, layer_kv, matmul
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), matmul), layer_kv


class LlamaForCausalLM(nnx.Module):
    """Every supported architecture; `config` switches biases, q/k norm, tying and RoPE scaling."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)

    def fuse_projections(self) -> None:
        """Concatenates each layer's q/k/v and gate/up kernels so each group is one matmul.

        At decode-sized batches XLA's CPU dot runs one [T, 2I] product about twice as fast as
        two [T, I] ones. The engine fuses its own copy of the layers; the HF layout (what the
        loaders fill and checkpoints store) is the default and computes the same function.
        """
        for layer in self.layers:
            layer.fuse_projections()

    def _rope_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        # positions: [T] -> cos, sin: [T, D], angles in float32 before the cast, as HF computes them
        inv_freq = jnp.asarray(self.config.rope_inv_freq())  # [D/2]
        angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)

    def __call__(
        self,
        token_ids: jax.Array,
        positions: jax.Array,
        kv: tuple,
        attention: AttentionFn,
        logits_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple]:
        """token_ids, positions: [T] int32; logits_index: [S] rows of T to score (None: all).

        Returns logits [S or T, vocab] float32 and the new per-layer kv tuple.
        """
        if len(kv) != len(self.layers):
            raise ValueError(f"kv has {len(kv)} entries for {len(self.layers)} layers")
        x = self.embed_tokens(token_ids)  # [T, hidden]
        cos, sin = self._rope_tables(positions)
        new_kv = []
        for layer_idx, layer in enumerate(self.layers):
            x, layer_kv = layer(x, cos, sin, layer_idx, attention, kv[layer_idx])
            new_kv.append(layer_kv)
        if logits_index is not None:
            # Only sampled rows need the vocab-wide projection, the largest matmul per token.
            x = x[logits_index]  # [S, hidden]
        x = self.norm(x)
        if self.lm_head is None:
            logits = x @ self.embed_tokens.embedding[...].T
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32), tuple(new_kv)


def abstract_model(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> LlamaForCausalLM:
    """The module with shapes and dtypes only (nothing allocated), for filling from a checkpoint.

    One layer is traced and cloned rather than the whole model traced at once: each rng draw
    under `eval_shape` inspects the trace so far, so one big trace costs time quadratic in depth
    (3.7 s instead of 0.3 s for SmolLM2's 30 layers).
    """
    shell = nnx.eval_shape(
        lambda: LlamaForCausalLM(
            dataclasses.replace(config, num_layers=0), dtype=dtype, rngs=nnx.Rngs(0)
        )
    )
    layer = nnx.eval_shape(lambda: DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    shell.config = config
    shell.layers = nnx.List([nnx.clone(layer) for _ in range(config.num_layers)])
    return shell
