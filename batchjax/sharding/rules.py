"""Logical axes of every array the model step holds, and the rules that map them to mesh axes.

Sharding is data: the step asks `spec(path)` for each parameter and `kv_spec()` for the pools,
and never names a mesh axis itself. Tensor parallelism (`RULES`) puts on the `model` axis:
- attention heads: the fused q/k/v columns (`qkv`, one device's heads side by side, see
  `tensor_parallel.Layout`) and the rows of the output projection (`heads`);
- MLP columns: the fused gate/up columns and the rows of the down projection (`mlp`);
- the KV pools' heads (`kv_heads`);
- the embedding table and the LM head as their placement says (`placement_rules`).
Norm weights are replicated, and so is every other logical axis (`layers`, `embed`: the
hidden axis of the residual stream, which every device holds whole, `head_dim`, `pages`, ...).

The embedding table `[V, H]` and the LM head `[H, V]` (a copy of the table where the two are
tied) have axes of their own, so each can be placed on its own; the step reads which of them is
on the `model` axis and runs the matching collective:
- table `replicated` (no axis split): every device looks its rows up, no collective;
- table `vocab` (`embed_vocab`): each device holds a slice of the rows; a lookup gathers the
  ids in its slice (zeros for the others) and a psum over `model` adds them up;
- table `embed` (`embed_hidden`): each device holds a slice of the hidden columns; a lookup
  reads its columns and an all_gather over `model` joins them;
- head `vocab` (`head_vocab`): each device scores its slice of the vocabulary, and the slices
  of the logits are gathered before sampling;
- head `embed` (`head_hidden`): each device holds a slice of the head's rows and multiplies
  the matching hidden columns of x; a psum over `model` adds up the `[S, V]` partial logits.
A vocabulary (hidden size) that does not split over the devices is padded with zero rows or
columns (`tensor_parallel.Layout`): padded ids are never looked up, padded logits are sliced
off before sampling, and zero hidden columns add nothing.

The default (`DEFAULT_PLACEMENT`) keeps the table replicated and the head over the vocabulary:
no other placement measured faster. `experiments.bench_tensor_parallel --placements=all
--repeats=15` (SmolLM2-135M, f32, T=3 on 3 host devices forced out of 2 cores, each placement
timed in turn on the `bench_engine` step layouts; two runs, and a third of 25 turns for the
closest rivals) put every other placement at 0.93x-1.14x of the default's time, its median of
paired ratios, with interquartile ranges of about +-0.1 around it: a tie within noise. The
one leaning is the head over `embed`: 1-7% faster on the widest decode (256 rows over 16
groups) and 2-7% slower on the prefill and on 64 rows, a wash. Splitting the table was
within the same noise (0.99x-1.11x), so where its memory matters `vocab/vocab` costs little.
Forced host devices make every collective a copy in one memory; real chips may rank them
differently, which is why the placement is an engine option (`placement="TABLE/HEAD"`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

EMBED_PLACEMENTS = ("replicated", "vocab", "embed")  # the embedding table's
HEAD_PLACEMENTS = ("vocab", "embed")  # the LM head's
# Which logical axis each placement puts on the `model` axis.
_EMBED_AXIS = {"replicated": None, "vocab": "embed_vocab", "embed": "embed_hidden"}
_HEAD_AXIS = {"vocab": "head_vocab", "embed": "head_hidden"}

TENSOR_PARALLEL: Mapping[str, str | None] = {
    "qkv": "model",
    "heads": "model",
    "mlp": "model",
    "kv_heads": "model",
}

# (embedding table, LM head): today's, which no other placement measured faster (see the
# module docstring).
DEFAULT_PLACEMENT = ("replicated", "vocab")


def parse_placement(text: str) -> tuple[str, str]:
    """"TABLE/HEAD" (e.g. "vocab/embed") -> (table, head), each checked."""
    table, sep, head = text.partition("/")
    if not sep or table not in EMBED_PLACEMENTS or head not in HEAD_PLACEMENTS:
        raise ValueError(
            f"placement {text!r} is not TABLE/HEAD with TABLE one of "
            f"{', '.join(EMBED_PLACEMENTS)} and HEAD one of {', '.join(HEAD_PLACEMENTS)}")
    return table, head


def placement_rules(embed: str = DEFAULT_PLACEMENT[0], head: str = DEFAULT_PLACEMENT[1]
                    ) -> dict[str, str | None]:
    """The tensor-parallel rules with the embedding table and the LM head placed as asked."""
    if embed not in EMBED_PLACEMENTS:
        raise ValueError(f"embedding placement {embed!r}: choose one of "
                         f"{', '.join(EMBED_PLACEMENTS)}")
    if head not in HEAD_PLACEMENTS:
        raise ValueError(f"LM head placement {head!r}: choose one of {', '.join(HEAD_PLACEMENTS)}")
    out = dict(TENSOR_PARALLEL)
    if _EMBED_AXIS[embed] is not None:
        out[_EMBED_AXIS[embed]] = "model"
    out[_HEAD_AXIS[head]] = "model"
    return out


RULES: Mapping[str, str | None] = placement_rules()


def placement(rules: Mapping[str, str | None] | None = None) -> tuple[str, str]:
    """(table, head) placement that `rules` give: which of their axes is on the `model` axis."""
    rules = RULES if rules is None else rules

    def one(what: str, choices: Mapping[str, str | None]) -> str:
        split = {name: rules[axis] for name, axis in choices.items()
                 if axis is not None and rules.get(axis) is not None}
        if len(split) > 1 or set(split.values()) - {"model"}:
            cuts = ", ".join(f"{choices[name]} over {axis!r}" for name, axis in split.items())
            raise ValueError(f"the {what} is split one axis at a time, over 'model'; these "
                             f"rules split {cuts}")
        if split:
            return next(iter(split))
        if None not in choices.values():
            raise ValueError(f"these rules put no axis of the {what} on 'model' (choose one of "
                             f"{', '.join(choices)})")
        return next(name for name, axis in choices.items() if axis is None)

    return one("embedding table", _EMBED_AXIS), one("LM head", _HEAD_AXIS)


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
HEAD_AXES = ("head_hidden", "head_vocab")  # the LM head [H, V] (a copy of the tied embedding)
OTHER_AXES: Mapping[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("embed_vocab", "embed_hidden"),
    ("norm", "weight"): ("embed",),
    ("head",): HEAD_AXES,
}
KV_AXES = ("layers", "pages", "page", "kv_heads", "head_dim")


def to_spec(axes: Sequence[str | None], rules: Mapping[str, str | None] | None = None
            ) -> PartitionSpec:
    """Logical axes -> a PartitionSpec (axes without a rule are replicated)."""
    rules = RULES if rules is None else rules
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
        kernel = HEAD_AXES if name == "lm_head" else next(
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
               rules: Mapping[str, str | None] | None = None) -> PartitionSpec:
    return to_spec(param_axes(path, ndim, size), rules)


def kv_spec(rules: Mapping[str, str | None] | None = None) -> PartitionSpec:
    """The KV pools `[L, pages, page_size, Hkv, D]`: heads over the `model` axis."""
    return to_spec(KV_AXES, rules)
