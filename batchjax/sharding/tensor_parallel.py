"""Tensor-parallel layout: how a model's weights are cut so each device holds whole heads.

With `T` devices on the `model` axis, device `d` holds query heads `[d Hq/T, (d+1) Hq/T)`,
the KV heads they read, MLP columns `[d I/T, (d+1) I/T)` and, as `rules` place them, slices
of the embedding table and the LM head (over the vocabulary, padded to split evenly, or over
the hidden axis, padded likewise). The fused projections are laid out per device: the q/k/v
kernel's columns are device 0's q, k and v heads, then device 1's, ..., so cutting the fused
columns into T equal blocks gives each device its own q/k/v (gate/up likewise). After the
output and down projections (rows cut the same way) one all-reduce per projection sums the
partial products: the two all-reduces per block of Megatron-style tensor parallelism.

KV heads: when T divides the KV heads, each device keeps Hkv/T of them; when the KV heads
divide T, each KV head is replicated on the T/Hkv devices whose query heads read it (as vLLM
does); any other T cannot be split and `Layout.for_model` says which sizes can.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from batchjax.models.config import ModelConfig

VOCAB_MULTIPLE = 16  # each device's vocabulary slice stays a whole number of packed panels


class ShardingError(ValueError):
    """The model cannot be split over the mesh asked for."""


def workable_sizes(config: ModelConfig) -> list[int]:
    """Every tensor-parallel size this model's heads and MLP can be split over."""
    hq, hkv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    return [t for t in range(1, hq + 1)
            if hq % t == 0 and inter % t == 0 and (hkv % t == 0 or t % hkv == 0)]


@dataclasses.dataclass(frozen=True)
class Layout:
    config: ModelConfig
    tensor_parallel: int

    @classmethod
    def for_model(cls, config: ModelConfig, tensor_parallel: int) -> "Layout":
        t = tensor_parallel
        hq, hkv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
        problems = []
        if hq % t:
            problems.append(f"{hq} query heads do not split over {t} devices")
        if hkv % t and t % hkv:
            problems.append(f"{hkv} KV heads neither split over {t} devices nor replicate "
                            f"evenly onto them")
        if inter % t:
            problems.append(f"an MLP of {inter} columns does not split over {t} devices")
        if problems:
            sizes = ", ".join(map(str, workable_sizes(config)))
            raise ShardingError(
                f"tensor_parallel={t} cannot split this model ({hq} query heads, {hkv} KV "
                f"heads, MLP {inter}): {'; '.join(problems)}. Sizes that work: {sizes}")
        return cls(config, t)

    @property
    def local_heads(self) -> int:
        return self.config.num_heads // self.tensor_parallel

    @property
    def kv_replicated(self) -> bool:
        return self.tensor_parallel > self.config.num_kv_heads

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.tensor_parallel)

    @property
    def pool_kv_heads(self) -> int:
        """KV heads of the (global) pool arrays: each device's local heads side by side."""
        return self.local_kv_heads * self.tensor_parallel

    @property
    def local_intermediate(self) -> int:
        return self.config.intermediate_size // self.tensor_parallel

    @property
    def padded_vocab(self) -> int:
        m = VOCAB_MULTIPLE * self.tensor_parallel
        return -(-self.config.vocab_size // m) * m

    def local_config(self) -> ModelConfig:
        """The decoder one device computes: its heads and MLP columns."""
        return dataclasses.replace(
            self.config, num_heads=self.local_heads, num_kv_heads=self.local_kv_heads,
            intermediate_size=self.local_intermediate)

    def _kv_heads_of(self, device: int) -> list[int]:
        if self.kv_replicated:
            return [device * self.config.num_kv_heads // self.tensor_parallel]
        n = self.local_kv_heads
        return list(range(device * n, (device + 1) * n))

    def qkv_columns(self) -> np.ndarray:
        """Column indices into `concat([q, k, v], -1)` in the per-device fused order."""
        c, d = self.config, self.config.head_dim
        nq, nk = c.num_heads * d, c.num_kv_heads * d
        cols = []
        for dev in range(self.tensor_parallel):
            q_heads = range(dev * self.local_heads, (dev + 1) * self.local_heads)
            kv_heads = self._kv_heads_of(dev)
            cols += [np.arange(h * d, (h + 1) * d) for h in q_heads]
            cols += [nq + np.arange(h * d, (h + 1) * d) for h in kv_heads]
            cols += [nq + nk + np.arange(h * d, (h + 1) * d) for h in kv_heads]
        return np.concatenate(cols)

    def gate_up_columns(self) -> np.ndarray:
        """Column indices into `concat([gate, up], -1)` in the per-device fused order."""
        inter, n = self.config.intermediate_size, self.local_intermediate
        return np.concatenate([
            np.concatenate([np.arange(dev * n, (dev + 1) * n),
                            inter + np.arange(dev * n, (dev + 1) * n)])
            for dev in range(self.tensor_parallel)])

    def fuse_qkv(self, q, k, v):
        """q, k, v kernels `[..., K, N]` (or biases `[..., N]`) -> the fused per-device one."""
        return jnp.concatenate([q, k, v], axis=-1)[..., self.qkv_columns()]

    def fuse_gate_up(self, gate, up):
        return jnp.concatenate([gate, up], axis=-1)[..., self.gate_up_columns()]

    @property
    def padded_hidden(self) -> int:
        """The hidden size rounded up to a multiple of the devices (for an embedding table or
        LM head split over its hidden axis)."""
        t = self.tensor_parallel
        return -(-self.config.hidden_size // t) * t

    def pad_vocab(self, w, axis: int = -1):
        """`w` (the LM head `[..., H, V]`, or the embedding table `[V, H]` with `axis=0`) with
        zeros up to `padded_vocab` along `axis`: padded logits are sliced off before sampling
        and padded rows are never looked up, so they never win."""
        return _pad_to(w, axis, self.padded_vocab)

    def pad_hidden(self, w, axis: int):
        """`w` with zeros up to `padded_hidden` along its hidden `axis`: zero columns of a
        lookup are sliced off after it, zero rows of the head add nothing to the logits."""
        return _pad_to(w, axis, self.padded_hidden)


def _pad_to(w, axis: int, size: int):
    extra = size - w.shape[axis]
    if not extra:
        return w
    pads = [(0, 0)] * w.ndim
    pads[axis] = (0, extra)
    return jnp.pad(w, pads)
