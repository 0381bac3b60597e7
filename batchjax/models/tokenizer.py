"""Tokenizers: HF `tokenizer.json` and GGUF vocabularies behind one interface.

Both become a `tokenizers.Tokenizer`; chat templates are rendered with jinja2 the way
transformers renders them; `IncrementalDetokenizer` turns a stream of token ids into text deltas
that never split a multi-byte character, so a stop string is seen at the token that completes it.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from batchjax.models.config import ModelFileError, UnsupportedModelError

# GGUF token types (llama.cpp's `llama_token_type`).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# Pre-tokenizer splits for the GGUF `tokenizer.ggml.pre` values whose BPE merges were learned on
# text cut differently from GPT-2's; any other value (e.g. SmolLM2's "smollm") means GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(c) for byte, c in zip(printable, chars)}


def _token_content(token: Any) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as serialized AddedTokens.
    if isinstance(token, dict):
        return token.get("content")
    return token


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids, chat templates, and the ids that end a generation."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Sequence[int],
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self.backend = backend
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile_template(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]), as the model's
        template writes it; extra keyword arguments reach the template (e.g. enable_thinking)."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template; send plain prompts instead")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **template_vars,
        )

    def save(self, directory: str) -> None:
        """Writes tokenizer.json and tokenizer_config.json, readable by `from_directory`."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        config = {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_token_ids": list(self.eos_token_ids),
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    @classmethod
    def from_directory(
        cls, directory: str, extra_eos_token_ids: Sequence[int] = ()
    ) -> Tokenizer | None:
        """A HF directory's tokenizer, or None when it has no tokenizer.json.

        End-of-sequence ids are the union of generation_config.json's, the tokenizer's own
        eos token, and `extra_eos_token_ids` (config.json's)."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise ModelFileError(path, f"not a tokenizer file: {e}") from None
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one renders plain chats
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                template = f.read()
        eos_token = _token_content(config.get("eos_token"))
        generation = _read_json(os.path.join(directory, "generation_config.json"))
        eos_ids = list(config.get("eos_token_ids") or [])
        generation_eos = generation.get("eos_token_id")
        eos_ids += [generation_eos] if isinstance(generation_eos, int) else generation_eos or []
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos_ids.append(backend.token_to_id(eos_token))
        return cls(
            backend,
            eos_token_ids=[*eos_ids, *extra_eos_token_ids],
            chat_template=template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=eos_token,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Builds the byte-level BPE tokenizer a GGUF describes (`tokenizer.ggml.*` keys)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer model {kind!r} is not supported; "
                "supported: 'gpt2' (byte-level BPE)"
            )
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or []
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        # Tokens written in plain text instead of the byte alphabet are respelled so BPE finds them.
        vocab = {
            (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        split = _GGUF_PRE_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_end|>) must match whole in text; any outside the byte alphabet are
        # llama.cpp mislabels that would grow the vocabulary past the embedding table.
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, token_types)
                if kind == _GGUF_CONTROL and set(t) <= spelled
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, kind in zip(tokens, token_types)
                if kind == _GGUF_USER_DEFINED and t in vocab
            ]
        )
        bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        if bos is not None and metadata.get("tokenizer.ggml.add_bos_token"):
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        return cls(
            backend,
            eos_token_ids=[] if eos_id is None else [eos_id],
            chat_template=metadata.get("tokenizer.chat_template"),
            bos_token=bos,
            eos_token=tokens[eos_id] if eos_id is not None else None,
        )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError as e:
        raise ModelFileError(path, f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFileError(path, "must hold a JSON object")
    return value


class IncrementalDetokenizer:
    """Turns generated token ids, fed one at a time, into text deltas.

    A delta is emitted only once the decoded text stops ending in an incomplete character
    (U+FFFD), so `"".join(deltas)` is always a prefix of the full decode and the delta in which a
    stop string first appears belongs to the token that completed it. Decoding restarts from a
    recent window (`prefix_offset`), not the whole sequence, so each step costs O(window).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        # Decoding the window with some context keeps the joins (spaces, merged bytes) right.
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as decoded."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta
