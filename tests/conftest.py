"""Shared pytest setup: hardware marks skip cleanly when the device is absent."""

import fcntl
import json
import os
import shutil

import pytest

# Tests run on the CPU unless a hardware-marked run asks for more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs and run each a few times: cheaper LLVM passes roughly halve
# compile time and change no result.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def _has_platform(name: str) -> bool:
    try:
        import jax

        return any(d.platform == name for d in jax.devices())
    except Exception:  # noqa: BLE001 - no backend of that kind at all
        return False


def pytest_collection_modifyitems(config, items):
    del config
    have: dict[str, bool] = {}
    for item in items:
        for platform in ("gpu", "tpu"):
            if platform in item.keywords:
                if platform not in have:
                    have[platform] = _has_platform(platform)
                if not have[platform]:
                    item.add_marker(pytest.mark.skip(reason=f"needs a {platform.upper()}"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (GQA, untied) saved in HF format, without a tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer (49,152 ids), read from its GGUF file without the weights."""
    from batchjax.models.registry import load_tokenizer

    return load_tokenizer("smollm2-135m")[0]


@pytest.fixture(scope="session")
def tiny_llama_tok_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama over SmolLM2's tokenizer, saved in HF format with the tokenizer."""
    import torch
    import transformers

    tokenizer = smollm2_tokenizer
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=list(tokenizer.eos_token_ids))
    path = tmp_path_factory.mktemp("tiny_llama_tok")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save(str(path))
    return path


def hf_greedy(model_dir, prompts, max_new_tokens):
    """transformers' greedy continuation of each prompt (token ids), one at a time."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            outs.append(tuple(gen[0, len(p):].tolist()))
    return outs


def once_per_session(tmp_path_factory, name, compute) -> dict:
    """compute(directory) -> JSON value, run by one pytest-xdist worker and read by the others."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    done = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            directory = root / name
            shutil.rmtree(directory, ignore_errors=True)  # what a failed attempt left
            directory.mkdir()
            value = compute(directory)
            tmp = root / f"{name}.json.tmp"
            tmp.write_text(json.dumps(value))
            os.replace(tmp, done)
        return json.loads(done.read_text())
