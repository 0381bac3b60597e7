"""Fills an abstract `LlamaForCausalLM` with tensors named as in HF checkpoints.

Every loader (safetensors, GGUF) yields `(hf_name, array)` one tensor at a time; each is moved to
the device and cast before the next is read, so host memory never holds the whole model twice.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batchjax.models.config import ModelConfig
from batchjax.models.llama import LlamaForCausalLM, abstract_model

# Checkpoint entries that carry no parameter of ours (HF recomputes them from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
    """A tensor is missing, unexpected, or has a shape the config does not imply."""


def _target(model: LlamaForCausalLM, name: str) -> tuple[nnx.Variable, bool]:
    """The variable a HF tensor name fills, and whether its [out, in] layout needs transposing."""
    parts = name.removeprefix("model.").split(".")
    node = model
    try:
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
    except (AttributeError, IndexError):
        node = None
    leaf = parts[-1]
    if isinstance(node, nnx.Linear) and leaf in ("weight", "bias"):
        variable = node.kernel if leaf == "weight" else node.bias
        return variable, leaf == "weight"
    if isinstance(node, nnx.Embed) and leaf == "weight":
        return node.embedding, False
    variable = getattr(node, leaf, None) if node is not None else None
    if not isinstance(variable, nnx.Param):
        raise CheckpointMismatchError(
            f"tensor {name!r} has no place in a {model.config.architecture} with this config"
        )
    return variable, False


def load_weights(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    dtype: jnp.dtype = jnp.float32,
) -> LlamaForCausalLM:
    """Builds the model from HF-named tensors ([out, in] linear weights, as HF stores them)."""
    model = abstract_model(config, dtype)
    for name, array in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix a second time
        variable, transpose = _target(model, name)
        expected = tuple(variable.get_value().shape)
        got = tuple(reversed(array.shape)) if transpose else tuple(array.shape)
        if got != expected:
            shown = tuple(array.shape)
            want = tuple(reversed(expected)) if transpose else expected
            raise CheckpointMismatchError(
                f"tensor {name!r} has shape {shown} in the checkpoint, the config implies {want}"
            )
        # Cast and transpose on the device: faster than numpy for bf16 and leaves no host copy.
        # set_value, not `variable[...] =`: the abstract variable holds a ShapeDtypeStruct.
        value = jnp.asarray(array)
        variable.set_value((value.T if transpose else value).astype(dtype))
    missing = [
        ".".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Param) and isinstance(node.get_value(), jax.ShapeDtypeStruct)
    ]
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint lacks {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}"
        )
    return model
