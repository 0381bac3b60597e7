"""Model loading and forward-pass speed, against the machine's matmul roofline measured now.

    python -m experiments.bench_model [--model=smollm2-135m] [--prefill_tokens=512] \
        [--decode_batch=64] [--dtype=float32] [--json_out=FILE]

Load times: the GGUF (parse + dequantize), the same weights as a HF safetensors directory, and
the orbax checkpoint `experiments.convert` writes. Forward passes run the dense attention path
(no KV cache) jitted the way the engine jits it (split once, merge inside): a prefill of one
sequence, and a decode-like batch of single-token sequences (weights read once for many rows;
attention over a long context is not part of it). Model FLOP utilisation is the model's matmul
FLOPs per second over the f32 matmul GFLOP/s of a large `jnp.dot` timed in the same process.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from safetensors.numpy import save_file

from batchjax.attention.dense import dense_causal_attention
from batchjax.bench.roofline import matmul_gflops, median_seconds
from batchjax.models.flops import forward_flops
from batchjax.models.config import ModelConfig
from batchjax.models.llama import LlamaForCausalLM
from batchjax.models.registry import DEFAULT_MODEL, convert_to_checkpoint, load_model

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "A .gguf spec: smollm2-135m or FILE.gguf.")
_PREFILL = flags.DEFINE_integer("prefill_tokens", 512, "Tokens of the prefill forward pass.")
_DECODE = flags.DEFINE_integer("decode_batch", 64, "Single-token sequences in the decode pass.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
_MATMUL = flags.DEFINE_integer("matmul_size", 0, "Roofline matmul side; 0 = by platform.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON.")


def _write_hf_directory(config: ModelConfig, model: LlamaForCausalLM, directory: str) -> None:
    """The loaded weights as a HF directory (config.json + model.safetensors), HF names."""
    hf_config = {
        "architectures": [config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "eos_token_id": list(config.eos_token_ids),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)
    tensors = {}
    for path, param in nnx.iter_graph(model):
        if not isinstance(param, nnx.Param):
            continue
        names = [str(p) for p in path]
        value = np.asarray(param[...])
        if names[-1] == "kernel":
            names[-1], value = "weight", value.T
        elif names[-1] == "embedding":
            names[-1] = "weight"
        name = ".".join(names)
        tensors[name if name.startswith("lm_head") else "model." + name] = np.ascontiguousarray(
            value
        )
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def _timed_load(spec: str, dtype: jnp.dtype):
    start = time.perf_counter()
    loaded = load_model(spec, dtype=dtype)
    jax.block_until_ready(nnx.state(loaded.model))
    return loaded, round(time.perf_counter() - start, 2)


def _forward_fn(model: LlamaForCausalLM, tokens, positions, segments, logits_index):
    graphdef, state = nnx.split(model)
    num_layers = len(model.layers)

    @jax.jit
    def forward(state, tokens, positions, segments, logits_index):
        attention = dense_causal_attention(segments, positions)
        logits, _ = nnx.merge(graphdef, state)(
            tokens, positions, (None,) * num_layers, attention, logits_index
        )
        return logits

    return lambda: forward(state, tokens, positions, segments, logits_index)


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    device = jax.devices()[0]
    figures: dict[str, object] = {
        "device": f"{device.platform}:{device.device_kind}",
        "cpu_count": os.cpu_count(),
        "dtype": _DTYPE.value,
    }
    gguf, figures["load_gguf_s"] = _timed_load(_MODEL.value, dtype)
    config = gguf.config
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir, ckpt_dir = os.path.join(scratch, "hf"), os.path.join(scratch, "ckpt")
        os.makedirs(hf_dir)
        _write_hf_directory(config, gguf.model, hf_dir)
        _, figures["load_safetensors_s"] = _timed_load(hf_dir, dtype)
        convert_to_checkpoint(hf_dir, ckpt_dir, dtype)
        _, figures["load_orbax_s"] = _timed_load(ckpt_dir, dtype)

    size = _MATMUL.value or (2048 if device.platform == "cpu" else 8192)
    peak = matmul_gflops(size, _REPEATS.value)
    figures["matmul_size"] = size
    figures["matmul_f32_gflops"] = round(peak, 1)

    rng = np.random.default_rng(0)
    t = _PREFILL.value
    prefill = _forward_fn(
        gguf.model,
        jnp.asarray(rng.integers(0, config.vocab_size, t), jnp.int32),
        jnp.arange(t, dtype=jnp.int32),
        jnp.zeros(t, jnp.int32),
        jnp.asarray([t - 1], jnp.int32),
    )
    b = _DECODE.value
    decode = _forward_fn(
        gguf.model,
        jnp.asarray(rng.integers(0, config.vocab_size, b), jnp.int32),
        jnp.zeros(b, jnp.int32),
        jnp.arange(b, dtype=jnp.int32),  # one sequence per token
        jnp.arange(b, dtype=jnp.int32),
    )
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(gguf.model)))
    for name, fn, contexts, rows in (
        ("prefill", prefill, np.arange(1, t + 1), 1),
        ("decode", decode, np.ones(b, np.int64), b),
    ):
        seconds = median_seconds(fn, _REPEATS.value)
        gflops = forward_flops(config, contexts, rows) / seconds / 1e9
        figures[f"{name}_tokens"] = len(contexts)
        figures[f"{name}_ms"] = round(seconds * 1e3, 2)
        figures[f"{name}_tokens_per_s"] = round(len(contexts) / seconds, 1)
        figures[f"{name}_gflops"] = round(gflops, 1)
        figures[f"{name}_mfu"] = round(gflops / peak, 3)
        figures[f"{name}_weight_gb_per_s"] = round(param_bytes / seconds / 1e9, 1)

    for key, value in figures.items():
        print(f"{key:28s} {value}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
