"""Converted models saved with orbax, so a second start skips parsing and dequantizing.

A checkpoint directory holds `batchjax_config.json` (the `ModelConfig`), `params/` (orbax,
the NNX parameter state as a plain nested dict) and, when the source had one, the tokenizer
(`tokenizer.json`, `tokenizer_config.json`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from batchjax.models.config import ModelConfig
from batchjax.models.llama import LlamaForCausalLM, abstract_model
from batchjax.models.tokenizer import Tokenizer

CONFIG_FILE = "batchjax_config.json"
_PARAMS_DIR = "params"


def is_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def save_checkpoint(
    directory: str,
    config: ModelConfig,
    model: LlamaForCausalLM,
    tokenizer: Tokenizer | None,
) -> None:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, _PARAMS_DIR), state, force=True)
    if tokenizer is not None:
        tokenizer.save(directory)
    # Written last: its presence marks a complete checkpoint.
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config.to_json())


def load_checkpoint(
    directory: str, dtype: jnp.dtype = jnp.float32
) -> tuple[ModelConfig, LlamaForCausalLM, Tokenizer | None]:
    """Restores straight into arrays of `dtype` (orbax casts if the saved dtype differs)."""
    directory = os.path.abspath(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a batchjax checkpoint")
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = ModelConfig.from_json(f.read())
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nnx.to_pure_dict(abstract_state),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(directory, _PARAMS_DIR), target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    model = nnx.merge(graphdef, abstract_state)
    tokenizer = Tokenizer.from_directory(directory, config.eos_token_ids)
    return config, model, tokenizer
