"""`ModelConfig`: the shape and switches of one Llama-family decoder, read from HF or GGUF.

One config covers Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 and Qwen3; the differences between
them are switches here (`attention_bias`, `qk_norm`, `tie_word_embeddings`, `rope_scaling`), not
separate model classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import numpy as np

# HF `architectures[0]` names this decoder computes exactly.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this decoder does not compute exactly."""


class ModelFileError(ValueError):
    """A model file that cannot be read (truncated, corrupted, impossible sizes); the message
    names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE stretch (`rope_type: llama3` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    # Bias on the q/k/v projections (Qwen2, and Llama with `attention_bias`).
    attention_bias: bool = False
    # Bias on the output projection (Llama's `attention_bias` covers it; Qwen2's does not).
    attention_output_bias: bool = False
    # RMSNorm over head_dim on q and k before RoPE (Qwen3).
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            least = 0 if name == "num_layers" else 1  # a model without layers is a shell
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0
                and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        fields = json.loads(text)
        scaling = fields.pop("rope_scaling")
        return cls(
            **{**fields, "eos_token_ids": tuple(fields["eos_token_ids"])},
            rope_scaling=Llama3RopeScaling(**scaling) if scaling else None,
        )

    def rope_inv_freq(self) -> np.ndarray:
        """[head_dim // 2] float32 angular frequencies, computed as HF does (float32 math)."""
        exponent = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / self.head_dim
        inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        if self.rope_scaling is None:
            return inv_freq
        s = self.rope_scaling
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, blended, scaled).astype(np.float32)


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(
        f"rope type {rope_type!r} is not supported; supported: 'default', 'llama3'"
    )


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Reads a HF `config.json` dict; refuses what would silently compute something else."""
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {architecture or '(none given)'!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu'"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window") or layer_types != {"full_attention"}:
        raise UnsupportedModelError("sliding-window attention layers are not supported")
    if architecture == "MistralForCausalLM" and hf.get("sliding_window"):
        logging.warning(
            "Mistral sliding_window=%d is not applied: attention spans the whole context, which "
            "matches the reference only for sequences up to that many tokens",
            hf["sliding_window"],
        )
    num_heads = int(hf["num_attention_heads"])
    theta, scaling = _rope_from_hf(hf)
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf["rms_norm_eps"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias and never an output bias.
        attention_bias=True if is_qwen2 else bias,
        attention_output_bias=False if is_qwen2 else bias,
        qk_norm=architecture == "Qwen3ForCausalLM",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_token_ids(hf.get("eos_token_id")),
    )
