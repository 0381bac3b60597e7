"""FLOPs a forward pass needs: what utilisation figures divide by time."""

from __future__ import annotations

import numpy as np

from batchjax.models.config import ModelConfig


def forward_flops(config: ModelConfig, context_lengths: np.ndarray, logits_rows: int) -> float:
    """Matmul FLOPs of one pass: projections and MLP per token, attention per (query, key)
    pair that the causal mask keeps, the vocabulary projection for the scored rows only.

    context_lengths: [tokens] keys each token attends to (itself included).
    """
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    per_token = h * (q_out + 2 * kv_out) + q_out * h + 3 * h * config.intermediate_size
    tokens = len(context_lengths)
    dense = 2 * per_token * tokens * config.num_layers
    attention = 4 * config.num_heads * d * int(np.sum(context_lengths)) * config.num_layers
    return float(dense + attention + 2 * h * config.vocab_size * logits_rows)
