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


def make_tiny_model(directory: str, seed: int = 0, max_position_embeddings: int = 512,
                    vocab_size: int | None = None) -> str:
    """Saves the model as a batchjax checkpoint in `directory` (kept if one is there already);
    returns the directory, a model spec for `Engine`. With `vocab_size`, the model has that
    many ids and no tokenizer (prompts are token ids): SmolLM2's 49,152-id vocabulary would
    make the logits the biggest cost of a step."""
    if is_checkpoint(directory):
        return directory
    tokenizer = None if vocab_size else load_tokenizer("smollm2-135m")[0]
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size or tokenizer.vocab_size, hidden_size=32,
        intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=1,
        eos_token_ids=(2,) if tokenizer is None else tokenizer.eos_token_ids)
    save_checkpoint(directory, config, LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), tokenizer)
    return directory
