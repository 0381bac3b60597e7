"""HF checkpoint directories: `config.json` plus `model.safetensors` or a sharded index."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from batchjax.models.config import (ModelConfig, ModelFileError, UnsupportedModelError,
                                    config_from_hf)
from batchjax.models.llama import LlamaForCausalLM
from batchjax.models.weights import load_weights

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a HF model directory needs its config.json")
    try:
        with open(path) as f:
            return config_from_hf(json.load(f))
    except UnsupportedModelError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as e:
        raise ModelFileError(path, f"not a usable model config: {type(e).__name__}: {e}") from None


def safetensors_files(directory: str) -> list[str]:
    """The weight files of a HF directory, single or sharded, in a stable order."""
    single = os.path.join(directory, _SINGLE_FILE)
    index = os.path.join(directory, _INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(index, f"not a shard index: {type(e).__name__}: {e}") from None
        files = [os.path.join(directory, shard) for shard in shards]
        absent = [p for p in files if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"{_INDEX_FILE} names shards that are missing: {absent}")
        return files
    raise FileNotFoundError(f"{directory} has neither {_SINGLE_FILE} nor {_INDEX_FILE}")


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Reads one tensor at a time (bf16 arrives as ml_dtypes.bfloat16), so peak host memory
    is one tensor, not the checkpoint."""
    for path in files:
        try:
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor
        except SafetensorError as e:
            raise ModelFileError(path, f"truncated or corrupted safetensors file: {e}") from None


class SliceReader:
    """Reads each tensor as a global `jax.Array` over devices that may span processes: every
    process reads from the file only the slices its own devices hold (`safe_open`'s
    `get_slice`), so a model larger than one host's memory loads a part on each host.

    `sharding_for(shape)`: the sharding a tensor of that shape is read into (what is read is
    then laid out for the step on the device, by all processes together). `bytes_read`:
    what this process has read so far.
    """

    def __init__(self, sharding_for: Callable[[tuple[int, ...]], jax.sharding.Sharding]):
        self.sharding_for = sharding_for
        self.bytes_read = 0

    def __call__(self, files: list[str]) -> Iterator[tuple[str, jax.Array]]:
        for path in files:
            try:
                with safe_open(path, framework="np") as f:
                    for name in f.keys():
                        yield name, self._read(f.get_slice(name))
            except SafetensorError as e:
                raise ModelFileError(path, f"truncated or corrupted safetensors file: {e}") \
                    from None

    def _read(self, tensor) -> jax.Array:
        shape = tuple(tensor.get_shape())

        def block(index) -> np.ndarray:
            part = np.asarray(tensor[index] if shape else tensor[:])
            self.bytes_read += part.nbytes
            return part

        return jax.make_array_from_callback(shape, self.sharding_for(shape), block)


def load_hf_directory(
    directory: str, dtype: jnp.dtype = jnp.float32, reader: SliceReader | None = None
) -> tuple[ModelConfig, LlamaForCausalLM]:
    """The model of a HF directory: whole tensors one at a time, or with `reader`, each
    process's slices of them."""
    config = read_hf_config(directory)
    files = safetensors_files(directory)
    tensors = iter_safetensors(files) if reader is None else reader(files)
    model = load_weights(config, tensors, dtype)
    return config, model
