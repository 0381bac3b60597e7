"""GGUF files (llama.cpp's format): config from metadata, weights dequantized with `gguf`.

Two llama.cpp conventions are undone here: tensor names (`blk.N.attn_q.weight`) are mapped back to
HF names, and for the `llama` architecture the q/k projection rows, which llama.cpp's converter
permutes for its interleaved RoPE, are put back in HF's rotate-half order.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import gguf
import numpy as np

from batchjax.models.config import ModelConfig, ModelFileError, UnsupportedModelError

# GGUF `general.architecture` -> the HF architecture that computes the same function.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        # The reader maps every tensor's data as it opens the file: a truncated file fails
        # here (its last tensors' views do not fit), before any work.
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises anything on a damaged file
        raise ModelFileError(path, f"not a readable GGUF file: {type(e).__name__}: {e}") from None


def metadata_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no counterpart in this model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = metadata_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    scaling = metadata_value(reader, f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in names or scaling not in ("none", None):
        raise UnsupportedModelError("GGUF files with RoPE scaling are not supported")

    def get(key: str, default: Any = None) -> Any:
        value = metadata_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    eos = metadata_value(reader, "tokenizer.ggml.eos_token_id")
    vocab = metadata_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        attention_output_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=metadata_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp stored each head's rows as interleaved (re, im) pairs; HF wants halves.
    rows = weight.shape[0]
    paired = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return paired.swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_tensors(
    reader: gguf.GGUFReader, config: ModelConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """Dequantizes one tensor at a time to float32, HF names and layouts ([out, in])."""
    permuted = metadata_value(reader, "general.architecture") == "llama"
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # A plain ndarray view: dequantizing through the memmap subclass is about twice slower.
        array = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute_rows(array, config.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute_rows(array, config.num_kv_heads)
        yield name, array


def tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The `tokenizer.*` metadata entries, decoded to Python values."""
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.")
    }
