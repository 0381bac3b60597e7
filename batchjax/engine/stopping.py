"""When a request is finished, and what its final text is.

The engine calls `StopChecker.update` once per sampled token with the text that token added
(from the incremental detokenizer; None or "" for token-only requests). Stop strings may span
several tokens: text that could still turn out to start a stop string is held back, and the
final text ends right before the first stop string.
"""

from __future__ import annotations

import dataclasses

from batchjax.requests import SamplingParams


@dataclasses.dataclass(frozen=True)
class FinishDecision:
    """Why a request ended.

    finish_reason: "stop" (EOS, a stop token id or a stop string) or "length" (max_tokens, or
    the model context is full). stop_reason: the stop string or token id that matched, None for
    "length". num_tokens: tokens generated, the last one included (an EOS or stop token is
    part of token_ids but adds no text). text: the completion text, cut before a stop string;
    None when no token brought text.
    """

    finish_reason: str
    stop_reason: str | int | None
    num_tokens: int
    text: str | None


class StopChecker:
    """Finish logic of one request; feed it every sampled token in order.

    A stop condition met by the last allowed token wins over "length": the request ended at a
    natural stopping point.
    """

    def __init__(self, sampling: SamplingParams, eos_token_ids: tuple[int, ...], max_model_len: int,
                 prompt_len: int):
        if prompt_len >= max_model_len:
            raise ValueError(f"prompt: {prompt_len} tokens leave no room in a context of {max_model_len}")
        self._sampling = sampling
        self._stop_ids = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else frozenset(eos_token_ids))
        # Generating stops when the sequence fills the context or max_tokens is reached.
        self._token_limit = min(sampling.max_tokens, max_model_len - prompt_len)
        self._longest_stop = max((len(s) for s in sampling.stop), default=0)
        self._text = ""
        self._has_text = False
        self._num_tokens = 0
        self._emitted = 0
        self._decision: FinishDecision | None = None

    @property
    def token_limit(self) -> int:
        """Tokens the request may generate at most: max_tokens, or what the context leaves."""
        return self._token_limit

    @property
    def finished(self) -> FinishDecision | None:
        return self._decision

    @property
    def emitted_text(self) -> str:
        """Text that is final already: nothing after it can turn it into part of a stop string."""
        return self._text[: self._emitted]

    def update(self, token_id: int, new_text: str | None) -> FinishDecision | None:
        """Takes the next sampled token and its text; returns a decision once the request ends."""
        if self._decision is not None:
            raise RuntimeError("update after the request finished")
        self._num_tokens += 1
        self._has_text = self._has_text or new_text is not None
        if token_id in self._stop_ids:
            # The stop token's own text (e.g. "</s>") is not part of the completion.
            return self._finish("stop", token_id, len(self._text))
        if new_text:
            searched_from = max(0, len(self._text) - self._longest_stop + 1)
            self._text += new_text
            match = self._first_stop_string(searched_from)
            if match is not None:
                start, stop = match
                return self._finish("stop", stop, start)
            self._emitted = len(self._text) - self._held_back()
        if self._num_tokens >= self._token_limit:
            return self._finish("length", None, len(self._text))
        return None

    def _first_stop_string(self, searched_from: int) -> tuple[int, str] | None:
        """The earliest stop string ending in the new text, as (start, stop string)."""
        found = [(i, stop) for stop in self._sampling.stop
                 if (i := self._text.find(stop, searched_from)) >= 0]
        return min(found, default=None)

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper start of some stop string."""
        held = 0
        for stop in self._sampling.stop:
            for n in range(min(len(stop) - 1, len(self._text)), held, -1):
                if self._text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _finish(self, reason: str, stop_reason: str | int | None, text_end: int) -> FinishDecision:
        self._text = self._text[:text_end]
        self._emitted = text_end
        self._decision = FinishDecision(reason, stop_reason, self._num_tokens,
                                        self._text if self._has_text else None)
        return self._decision
