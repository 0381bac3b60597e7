"""Grammar masks: which tokens a structured-output request may sample next.

The host half runs llguidance: `GrammarCompiler` turns a `StructuredSpec` into a `Matcher`
(compiled grammars are cached per spec, so requests sharing a schema share the work), and each
decode step a request's matcher writes its next-token mask into one row of an int32 bitmask
(`fill_bitmask`, tens of microseconds; `GrammarCompiler.fill_bitmasks` does many rows on
llguidance's threads) and then takes the sampled token (`consume`). The device half,
`apply_token_bitmask`, sets the logits of disallowed tokens to -inf inside the jitted sampler.

Bit j of word i of a row (little-endian within the int32 word) stands for token 32 * i + j.
Rows span the model's vocabulary (the logits' width), which may be wider or narrower than the
tokenizer's; ids the tokenizer does not have are never allowed. Once a grammar is complete only
the end-of-sequence ids are allowed, so a constrained request ends by sampling one of them.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import llguidance
import numpy as np

from batchjax.models.tokenizer import Tokenizer
from batchjax.structured import StructuredSpec


def num_words(vocab_size: int) -> int:
    """int32 words in one bitmask row for `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def _last_word_bits(vocab_size: int) -> int:
    """The bits of a row's last word that stand for real tokens, as an int32 value (-1: all)."""
    used = vocab_size % 32
    return -1 if used == 0 else (1 << used) - 1


def allow_all_row(vocab_size: int) -> np.ndarray:
    """The bitmask row of an unconstrained request: every token id below `vocab_size`."""
    row = np.full(num_words(vocab_size), -1, np.int32)
    row[-1] = _last_word_bits(vocab_size)
    return row


@jax.jit
def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits: [R, V] f32; bitmask: [R, W] int32 with W >= ceil(V / 32) -> [R, V], the logits of
    tokens whose bit is clear set to -inf. Bits past V are ignored."""
    rows, vocab = logits.shape
    if bitmask.shape[-1] * 32 < vocab:
        raise ValueError(f"bitmask of {bitmask.shape[-1]} words cannot cover {vocab} tokens")
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [R, W, 32]
    allowed = bits.reshape(rows, -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, -jnp.inf)


class GrammarCompiler:
    """Compiles `StructuredSpec`s into `Matcher`s for one tokenizer and one model vocabulary.

    Building it converts the tokenizer for llguidance (~0.3 s for a 49k vocabulary), so make one
    per engine. Compiled grammars are kept per spec (the last `cache_size` distinct specs);
    every `compile` of a cached spec returns a fresh matcher at the start of the grammar.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 128):
        if not tokenizer.eos_token_ids:
            raise ValueError("structured output needs a tokenizer with an end-of-sequence token")
        self.vocab_size = vocab_size
        self.num_words = num_words(vocab_size)
        # llguidance reads the tokenizer's JSON; padding or truncation settings would change
        # what it sees as the tokenization, so they are dropped from a copy.
        backend = copy.copy(tokenizer.backend)
        backend.no_padding()
        backend.no_truncation()
        # llguidance pads a vocabulary to n_vocab with tokens it never allows, but cannot
        # shrink one: a model narrower than its tokenizer gets its rows cut from a wider mask.
        ll_vocab = max(vocab_size, tokenizer.vocab_size)
        self._direct = num_words(ll_vocab) == self.num_words
        self._ll_words = num_words(ll_vocab)
        self._last_word = _last_word_bits(vocab_size)
        self.eos_token_ids = tuple(t for t in tokenizer.eos_token_ids if t < vocab_size)
        self._tokenizer = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=ll_vocab, eos_token=list(tokenizer.eos_token_ids))
        self._cache: collections.OrderedDict[StructuredSpec, llguidance.LLMatcher] = (
            collections.OrderedDict())
        self._cache_size = cache_size
        self._executor: llguidance.LLExecutor | None = None

    def compile(self, spec: StructuredSpec) -> Matcher:
        """A fresh matcher for `spec`; raises ValueError when the grammar does not compile for
        this tokenizer (a spec from `parse_structured` has already compiled without one)."""
        template = self._cache.get(spec)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer, spec.to_llguidance_grammar(),
                                            log_level=0)
            if template.is_error():
                raise ValueError(f"cannot compile {spec.describe()}: {template.get_error()}")
            self._cache[spec] = template
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec)
        # Copies share the compiled grammar and the lexer states built so far.
        return Matcher(self, template)

    def fill_bitmasks(self, rows: Sequence[tuple[Matcher, int]], out: np.ndarray) -> None:
        """`matcher.fill_bitmask(out[i])` for every (matcher, i) in `rows`, computed in parallel
        on llguidance's threads. out: [R, num_words] int32, C-contiguous; other rows untouched."""
        _check_rows(out, self.num_words)
        if out.ndim != 2 or not all(0 <= i < out.shape[0] for _, i in rows):
            raise ValueError(f"rows {[i for _, i in rows]} do not index a bitmask {out.shape}")
        if not self._direct:
            for matcher, i in rows:
                matcher.fill_bitmask(out[i])
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(
            [(m._matcher, i) for m, i in rows], out.ctypes.data, self.num_words * 4, out.shape[0])


def _check_rows(out: np.ndarray, words: int) -> None:
    # llguidance writes through a raw pointer: a wrong layout would corrupt memory, not raise.
    if out.dtype != np.int32 or out.shape[-1] != words or not out.flags.c_contiguous:
        raise ValueError(f"bitmask must be C-contiguous int32 rows of {words} words, got "
                         f"{out.dtype} {out.shape}")


class Matcher:
    """One request's position in its grammar. Get one from `GrammarCompiler.compile`.

    A preempted request that is recomputed from its prompt gets a fresh matcher (`reset`, or
    `compile` again) and `consume`s its generated tokens again; `fork` copies one mid-way.
    """

    def __init__(self, compiler: GrammarCompiler, template: llguidance.LLMatcher):
        self._compiler = compiler
        self._template = template
        self._matcher = template.deep_copy()
        self._eos_taken = False
        self._scratch = None if compiler._direct else np.zeros(compiler._ll_words, np.int32)

    @property
    def compiler(self) -> GrammarCompiler:
        """The compiler it came from (`fill_bitmasks` fills many matchers' rows at once)."""
        return self._compiler

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Writes the mask of the tokens allowed next into `out`, a C-contiguous int32 row of
        `num_words(vocab_size)` words. Only EOS once the grammar is complete."""
        c = self._compiler
        if out.shape != (c.num_words,):
            raise ValueError(f"bitmask row must have shape ({c.num_words},), got {out.shape}")
        _check_rows(out, c.num_words)
        if self._scratch is None:
            self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        else:
            self._matcher.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
            out[:] = self._scratch[: c.num_words]
            out[-1] &= c._last_word

    def consume(self, token_id: int) -> None:
        """Advances past `token_id`; raises ValueError (and stays where it was) if the token is
        not allowed here."""
        token_id = int(token_id)
        c = self._compiler
        if token_id in c.eos_token_ids:
            # EOS goes through consume_token: try_consume_tokens never takes it.
            ok = not self._eos_taken and self._matcher.is_accepting()
            if ok:
                ok = self._eos_taken = self._matcher.consume_token(token_id)
        else:
            ok = (0 <= token_id < c.vocab_size and not self._eos_taken
                  and self._matcher.try_consume_tokens([token_id]) == 1)
        if not ok:
            raise ValueError(f"token {token_id} is not allowed here by the grammar")

    @property
    def is_finished(self) -> bool:
        """True once nothing but EOS can follow (or EOS was consumed): the text is complete."""
        return self._eos_taken or self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (EOS is allowed next)."""
        return self._eos_taken or self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        """llguidance's message when the matcher failed inside (e.g. a parser resource limit);
        it then allows only EOS. None while healthy."""
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "unknown llguidance error"

    def reset(self) -> None:
        """Back to the start of the grammar, as if freshly compiled."""
        self._matcher = self._template.deep_copy()
        self._eos_taken = False

    def fork(self) -> Matcher:
        """An independent matcher at this one's position."""
        other = Matcher.__new__(Matcher)
        other._compiler, other._template = self._compiler, self._template
        other._matcher = self._matcher.deep_copy()
        other._eos_taken = self._eos_taken
        other._scratch = None if self._scratch is None else np.zeros_like(self._scratch)
        return other
