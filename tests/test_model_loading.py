"""Loading paths other than parity: orbax round trips, tokenizers in HF dirs, actionable errors.

The checkpoints here are written with numpy and safetensors directly (no torch), in HF's layout.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from batchjax.attention.dense import dense_causal_attention
from batchjax.models.config import UnsupportedModelError
from batchjax.models.registry import convert_to_checkpoint, load_model, resolve_spec
from batchjax.models.weights import CheckpointMismatchError

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _hf_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in shapes.items()}


def _write_hf_dir(directory, config=HF_CONFIG, tensors=None, with_tokenizer=False) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors if tensors is not None else _hf_tensors(config),
              os.path.join(directory, "model.safetensors"))
    if with_tokenizer:
        vocab = {c: n for n, c in enumerate("abcdefghijklmnopqrstuvwxyz<>/ !.")}
        backend = BackendTokenizer(models.WordLevel(vocab, unk_token="!"))
        backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        backend.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "."}, f)
    return str(directory)


def _logits(model, tokens: list[int]) -> np.ndarray:
    t = len(tokens)
    positions = jnp.arange(t, dtype=jnp.int32)
    attention = dense_causal_attention(jnp.zeros(t, jnp.int32), positions)
    logits, _ = model(jnp.asarray(tokens, jnp.int32), positions, (None,) * len(model.layers),
                      attention)
    return np.asarray(logits)


def test_hf_tensors_land_in_the_right_parameters(tmp_path):
    tensors = _hf_tensors(HF_CONFIG)
    loaded = load_model(_write_hf_dir(tmp_path, tensors=tensors))
    attn = loaded.model.layers[1].self_attn
    # Linear kernels are [in, out]: the transpose of HF's [out, in].
    np.testing.assert_array_equal(attn.k_proj.kernel[...],
                                  tensors["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(loaded.model.embed_tokens.embedding[...],
                                  tensors["model.embed_tokens.weight"])
    assert loaded.tokenizer is None
    assert loaded.config.eos_token_ids == (2, 3)


def test_orbax_checkpoint_restores_the_same_model_and_tokenizer(tmp_path):
    source = _write_hf_dir(tmp_path / "hf", with_tokenizer=True)
    convert_to_checkpoint(source, str(tmp_path / "ckpt"))
    original, restored = load_model(source), load_model(str(tmp_path / "ckpt"))
    assert restored.format == "orbax" and restored.config == original.config
    tokens = [5, 9, 1, 30, 2, 7]
    np.testing.assert_array_equal(_logits(restored.model, tokens), _logits(original.model, tokens))
    messages = [{"role": "user", "content": "hi"}]
    assert restored.tokenizer.apply_chat_template(messages) == "<user>hi"
    assert restored.tokenizer.encode("abc") == original.tokenizer.encode("abc") == [0, 1, 2]
    # config.json's eos ids and the tokenizer's own eos token ('.' is id 31) both end generation.
    assert set(restored.tokenizer.eos_token_ids) == {2, 3, 31}


def test_orbax_restore_casts_to_the_requested_dtype(tmp_path):
    source = _write_hf_dir(tmp_path / "hf")
    convert_to_checkpoint(source, str(tmp_path / "ckpt"))
    as_bf16 = load_model(str(tmp_path / "ckpt"), dtype=jnp.bfloat16)
    assert as_bf16.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    reference = _logits(load_model(source).model, [3, 4, 5])
    logits = _logits(as_bf16.model, [3, 4, 5])
    assert logits.dtype == np.float32
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_model(str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "no_such_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_spec(str(tmp_path / "empty"))
    directory = _write_hf_dir(tmp_path / "no_weights")
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(directory)


def test_unsupported_architecture_names_itself_and_the_supported_ones(tmp_path):
    config = {**HF_CONFIG, "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(_write_hf_dir(tmp_path, config=config))


def test_unsupported_rope_type_is_refused(tmp_path):
    config = {**HF_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(_write_hf_dir(tmp_path, config=config))


def test_shape_mismatch_names_the_tensor(tmp_path):
    config = {**HF_CONFIG, "intermediate_size": 20}
    named = r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"
    with pytest.raises(CheckpointMismatchError, match=named):
        load_model(_write_hf_dir(tmp_path, config=config, tensors=_hf_tensors(HF_CONFIG)))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    tensors = _hf_tensors(HF_CONFIG)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.mlp\.down_proj\.kernel"):
        load_model(_write_hf_dir(tmp_path / "missing", tensors=tensors))
    tensors = _hf_tensors(HF_CONFIG) | {"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_model(_write_hf_dir(tmp_path / "extra", tensors=tensors))


def test_tied_checkpoint_may_omit_or_repeat_lm_head(tmp_path):
    config = {**HF_CONFIG, "tie_word_embeddings": True}
    tensors = _hf_tensors(config)
    with_head = load_model(_write_hf_dir(tmp_path / "with_head", config, tensors))
    del tensors["lm_head.weight"]
    without_head = load_model(_write_hf_dir(tmp_path / "without_head", config, tensors))
    assert with_head.model.lm_head is None and without_head.model.lm_head is None
    np.testing.assert_array_equal(
        _logits(with_head.model, [4, 8]), _logits(without_head.model, [4, 8])
    )


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path):
    import subprocess
    import sys

    source = _write_hf_dir(tmp_path / "hf")
    out = tmp_path / "ckpt"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-m", "experiments.convert", f"--model={source}", f"--out={out}",
         "--dtype=bfloat16"],
        check=True, cwd=repo, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
    )
    shutil.rmtree(source)  # the checkpoint must not need its source
    restored = load_model(str(out), dtype=jnp.bfloat16)
    assert restored.format == "orbax" and restored.config.architecture == "LlamaForCausalLM"
