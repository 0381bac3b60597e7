"""A tiny random Llama over SmolLM2's tokenizer: a real model of every part of the engine
whose steps cost almost nothing, so what a run measures is the host's work (and the fault
campaign's jobs run in seconds). Nothing is downloaded: the tokenizer ships with the default
model's package."""

from __future__ import annotations

from flax import nnx

from batchjax.models.checkpoint import is_checkpoint, save_checkpoint
from batchjax.models.config import ModelConfig
from batchjax.models.llama import LlamaForCausalLM
from batchjax.models.registry import load_tokenizer


def make_tiny_model(directory: str, seed: int = 0, max_position_embeddings: int = 512) -> str:
    """Saves the model as a batchjax checkpoint in `directory` (kept if one is there already);
    returns the directory, a model spec for `Engine`."""
    if is_checkpoint(directory):
        return directory
    tokenizer = load_tokenizer("smollm2-135m")[0]
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=tokenizer.vocab_size, hidden_size=32,
        intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=tokenizer.eos_token_ids)
    save_checkpoint(directory, config, LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), tokenizer)
    return directory
