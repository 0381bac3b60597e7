"""Logical axes of every array the model step holds, and the rules that map them to mesh axes.

Sharding is data: the step asks `spec(path)` for each parameter and `kv_spec()` for the pools,
and never names a mesh axis itself. Tensor parallelism (`RULES`) puts on the `model` axis:
- attention heads: the fused q/k/v columns (`qkv`, one device's heads side by side, see
  `tensor_parallel.Layout`) and the rows of the output projection (`heads`);
- MLP columns: the fused gate/up columns and the rows of the down projection (`mlp`);
- the LM head's vocabulary columns (`head_vocab`): each device scores its slice, and the
  slices are gathered before sampling;
- the KV pools' heads (`kv_heads`).
The embedding table is replicated: a lookup reads T rows, so splitting it would save memory
but cost an all-reduce of the embeddings every step. Norm weights are replicated. Every other
logical axis (`layers`, `embed`, `head_dim`, `pages`, ...) is replicated.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

RULES: Mapping[str, str | None] = {
    "qkv": "model",
    "heads": "model",
    "mlp": "model",
    "head_vocab": "model",
    "kv_heads": "model",
}

# (module, parameter) -> logical axes of one layer's array (the step stacks layers in front).
LAYER_AXES: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("input_layernorm", "weight"): ("embed",),
    ("post_attention_layernorm", "weight"): ("embed",),
    ("qkv_proj", "kernel"): ("embed", "qkv"),
    ("qkv_proj", "bias"): ("qkv",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("o_proj", "bias"): ("embed",),
    ("q_norm", "weight"): ("head_dim",),
    ("k_norm", "weight"): ("head_dim",),
    ("gate_up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
}
OTHER_AXES: Mapping[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("embed_vocab", "embed"),
    ("norm", "weight"): ("embed",),
    ("head",): ("embed", "head_vocab"),  # the LM head [H, V] (a copy of the tied embedding)
}
KV_AXES = ("layers", "pages", "page", "kv_heads", "head_dim")


def to_spec(axes: Sequence[str | None], rules: Mapping[str, str | None] = RULES
            ) -> PartitionSpec:
    """Logical axes -> a PartitionSpec (axes without a rule are replicated)."""
    return PartitionSpec(*(rules.get(a) if a is not None else None for a in axes))


def param_axes(path: Sequence[str], ndim: int, size: int = 1) -> tuple[str | None, ...]:
    """Logical axes of the step's parameter at `path` (its keys in the params tree).

    `("layers", ..., module, name)` arrays are stacked over layers; `("packed", name)` are a
    kernel's panels `[L, N/16, K or K/2, 16 or 32]` (`batchjax.kernels.packed_matmul.pack`),
    whose axes follow the kernel's own `[L, K, N]`.
    """
    path = tuple(str(p) for p in path)
    if path[0] == "layers":
        if size == 0:  # a packed kernel's (stacked) placeholder left in the layer tree
            return (None,) * ndim
        axes = LAYER_AXES.get(path[-2:])
        if axes is None:
            raise KeyError(f"no sharding rule for layer parameter {'/'.join(path)}")
        return ("layers", *axes)
    if path[0] == "packed":
        name = path[1]
        kernel = ("embed", "head_vocab") if name == "lm_head" else next(
            v for (m, p), v in LAYER_AXES.items() if m == name and p == "kernel")
        k_axis, n_axis = kernel
        return ("layers", n_axis, k_axis, None)
    axes = OTHER_AXES.get(path[-2:], OTHER_AXES.get(path[-1:]))
    if axes is None:
        raise KeyError(f"no sharding rule for parameter {'/'.join(path)}")
    return axes


def tree_path_names(path) -> tuple[str, ...]:
    """A JAX tree path (`DictKey`s, `SequenceKey`s, a variable's `.value`) as its names."""
    names = []
    for key in path:
        if hasattr(key, "key"):
            names.append(str(key.key))
        elif hasattr(key, "idx"):
            names.append(str(key.idx))
    return tuple(names)


def param_spec(path: Sequence[str], ndim: int, size: int = 1,
               rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    return to_spec(param_axes(path, ndim, size), rules)


def kv_spec(rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """The KV pools `[L, pages, page_size, Hkv, D]`: heads over the `model` axis."""
    return to_spec(KV_AXES, rules)
