"""lm-evaluation-harness over the engine: the `batchjax` model, for every request kind.

lm-eval hands a model all of a task's requests at once, which is the job the engine is built
for. `loglikelihood` sends every (context, continuation) pair to one `Engine.score` call, so
the choices of a multiple-choice question, and the few-shot preamble every question repeats,
form prefix groups whose shared tokens are computed once; `loglikelihood_rolling` sends every
window of every document to one call; `generate_until` sends every prompt to one
`Engine.generate`.

Tokens are lm-eval's HF backend's (`HFLM`, `--model hf`): a pair is split by `TemplateLM`'s
own code (the context's trailing spaces move to the continuation, the continuation is what
the whole text has past the context's tokens), an empty context becomes the prefix token
(BOS, else EOS), a sequence too long is cut from the left, and generated text is cut at the
first stop sequence. So a task's scores compare item by item with `--model hf` on the same
weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import lm_eval.models  # noqa: F401 - lm-eval's own models, registered before ours (see below)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

# lm-eval fills its model registry from `lm_eval.models` only while the registry is empty, so
# registering first would hide `hf`, `vllm`, ...: hence the import above.

# Generation keys a request may carry besides until, max_gen_toks, do_sample and temperature.
_SAMPLING_KEYS = ("top_p", "top_k", "min_p")
_SEED_MOD = 2**32
# The engine runs a prompt shorter than the model's context (one position is left to sample
# into) and a scored sequence is its input plus the token its last logits score.
_POSITIONS_KEPT = 2

TokenPair = tuple[list[int], list[int]]


@register_model("batchjax")
class BatchjaxLM(TemplateLM):
    """An lm-eval model over one `Engine`: `--model batchjax --model_args model=...,dtype=...`."""

    def __init__(
        self,
        model: str | None = None,
        *,
        engine=None,
        policy: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        prefix_token_id: int | None = None,
        batch_size: Any = None,
        max_batch_size: Any = None,
        device: Any = None,
        **engine_options,
    ):
        """Either builds an engine (`model`, default smollm2-135m; `dtype`; `policy`; any
        `EngineOptions` field such as kv_budget_mb or max_tokens_per_step) or runs `engine`.

        `policy` overrides the engine's for every call. `max_length`: the most tokens a scored
        sequence feeds the model, as HFLM counts them (default: the model's context less the
        two positions the engine keeps, 8,190 for SmolLM2 against HFLM's 8,192).
        `max_gen_toks`: the generation limit of requests that set none. `seed`: sampled
        requests get seed + their index. `batch_size`, `max_batch_size` and `device` are what
        lm-eval passes every model; the engine sizes its own steps, so they are ignored.
        """
        super().__init__()
        del batch_size, max_batch_size, device
        if engine is None:
            from batchjax.engine.engine import Engine  # heavy: keep registering the model light

            built = {"policy": policy, "dtype": dtype}
            engine = Engine(model or "smollm2-135m",
                            **{k: v for k, v in built.items() if v is not None}, **engine_options)
        elif model is not None or dtype is not None or engine_options:
            raise ValueError("give an engine or the options to build one, not both")
        if engine.tokenizer is None:
            raise ValueError("lm-eval sends text: the model needs a tokenizer")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.policy = policy
        longest = engine.max_model_len - _POSITIONS_KEPT
        if max_length is not None and not 1 <= max_length <= longest:
            raise ValueError(f"max_length must be in [1, {longest}] for this model, got "
                             f"{max_length}")
        self.max_length = max_length or longest
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self._eot_token_id = (self.tokenizer.backend.token_to_id(self.tokenizer.eos_token)
                              if self.tokenizer.eos_token else engine.config.eos_token_ids[0])
        bos = self.tokenizer.bos_token
        self._prefix_token_id = (prefix_token_id if prefix_token_id is not None
                                 else self.tokenizer.backend.token_to_id(bos) if bos
                                 else self._eot_token_id)
        self._prefix_text = self.tokenizer.decode([self._prefix_token_id],
                                                  skip_special_tokens=False)

    # -- tokens, as HFLM has them -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """The tokenizer's ids; by default with its special tokens unless the text already
        starts with the prefix token's text (HFLM's rule)."""
        del kwargs
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self._prefix_text)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _fit(self, context: Sequence[int], continuation: Sequence[int]) -> TokenPair:
        """The pair cut from the left to `max_length` input tokens, the continuation whole."""
        if not continuation or len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored: "
                             f"it needs 1 to max_length={self.max_length}")
        whole = (list(context) + list(continuation))[-(self.max_length + 1):]
        return whole[: -len(continuation)], list(continuation)

    def _score(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        scores = self.engine.score([self._fit(c, x) for c, x in pairs], policy=self.policy)
        return [(s.logprob, s.is_greedy) for s in scores]

    # -- the three request kinds --------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(logprob, is_greedy) of each ((context, continuation), context ids, continuation
        ids), all in one engine job."""
        del disable_tqdm, kwargs  # the engine shows its own progress
        return self._score([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's logprob under the model, every token predicted once: lm-eval's
        disjoint rolling windows of `max_length`, the first after the prefix token."""
        del disable_tqdm
        windows: list[TokenPair] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(token_list=tokens,
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._score(windows) if windows else []):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, up to its first stop sequence (`until`, and the EOS
        text) or `max_gen_toks`; greedy unless `do_sample`."""
        del disable_tqdm
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        batch, stops = [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until"), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            do_sample, temperature = kwargs.pop("do_sample"), kwargs.pop("temperature", 0.0)
            unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS))
            if unknown:
                raise ValueError(f"generation kwargs {unknown} are not supported; besides until, "
                                 f"max_gen_toks, do_sample and temperature: {_SAMPLING_KEYS}")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
            batch.append({"id": str(i), "prompt_token_ids": prompt, "max_tokens": max_gen_toks,
                          "stop": [s for s in until if s],
                          "temperature": temperature if do_sample else 0.0,
                          "seed": (self.seed + i) % _SEED_MOD, **kwargs})
            stops.append(until)
        results = self.engine.generate(batch, policy=self.policy) if batch else []
        texts = []
        for result, until in zip(results, stops):
            if result.error is not None:
                raise RuntimeError(f"request {result.id}: {result.error.message}")
            texts.append(postprocess_generated_text(result.text or "", until, None))
        return texts

    # -- chat templates and bookkeeping -------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.engine.model_source.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The model's chat template over the history; without a generation prompt the text
        ends where the last message's content does, so the model continues that message
        (transformers' continue_final_message, as HFLM asks for it)."""
        text = self.tokenizer.apply_chat_template(chat_history,
                                                  add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt:
            final = chat_history[-1]["content"].strip()
            text = text[: text.rindex(final) + len(final)]
        return text

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": self.engine.model_source,
                "model_dtype": self.engine.options.dtype,
                "policy": self.policy or self.engine.policy}
