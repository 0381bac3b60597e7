"""Accelerators and model shapes the simulator knows, by name (public spec-sheet figures).

Figures, per chip:
- A100-80GB SXM: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e, NVLink 3 at 600 GB/s (both
  directions together), so 300 GB/s each way (NVIDIA A100 datasheet).
- H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s, so 450 GB/s each
  way (NVIDIA H100 datasheet).
- H200 SXM: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e, 141 GB, NVLink 4 at 900 GB/s, so 450 GB/s
  each way (NVIDIA H200 datasheet).
- TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM2, 16 GiB, inter-chip interconnect (ICI) 1,600 Gbps
  = 200 GB/s per chip (Google Cloud's TPU v5e page); taking all of it as one ring direction's
  bandwidth is an assumption, an optimistic one.
A ring collective is limited by one direction of a chip's link, hence the per-direction
figures. The per-collective latency (launch, synchronisation, the ring's hops for a small
message) of 10 us is an assumed round figure, not a measurement. Tensor parallelism stays
within one link domain: 8 GPUs of one NVLink (HGX) board, or a 256-chip v5e slice over ICI.
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Device:
    """One chip, and the link it has to the other chips of a tensor-parallel group."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int
    link_bytes_per_s: float | None = None  # one direction, per chip; None: no tensor parallel
    collective_latency_s: float = 0.0  # fixed cost of one all-reduce or all-gather
    link_domain_chips: int = 1  # most chips one tensor-parallel group may span


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's sizes; weights and KV are bf16 (2 bytes)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    bytes_per_value: int = 2

    @property
    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)  # q, o, k, v
        return attention + 3 * h * self.intermediate_size  # gate, up, down

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.num_layers * self.layer_params + embeddings + head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.bytes_per_value

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_value


DEVICES = {
    d.name: d
    for d in (
        Device("a100-80gb", 312e12, 2.039e12, 80 * GIB, 300e9, 10e-6, 8),
        Device("h100", 989e12, 3.35e12, 80 * GIB, 450e9, 10e-6, 8),
        Device("h200", 989e12, 4.8e12, 141 * 10**9, 450e9, 10e-6, 8),
        Device("tpu-v5e", 197e12, 819e9, 16 * GIB, 200e9, 10e-6, 256),
    )
}

MODELS = {
    m.name: m
    for m in (
        ModelShape("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelShape("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        ModelShape("qwen-2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064),
        ModelShape("qwen-2.5-14b", 48, 5120, 40, 8, 128, 13824, 152064),
        # The engine's default model: with it, a replay's FLOPs are those of the CPU runs.
        ModelShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, tie_word_embeddings=True),
    )
}


def profile_for(device_kind: str) -> str | None:
    """The profile of a real device by its name (JAX's `device_kind`, e.g. "NVIDIA H100 80GB
    HBM3"), or None where none fits (a CPU)."""
    kind = device_kind.lower()
    return next((name for name in ("h200", "h100", "a100-80gb") if name.split("-")[0] in kind),
                None)


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)}")
    return DEVICES[name]


def get_model(name: str) -> ModelShape:
    if name not in MODELS:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]
