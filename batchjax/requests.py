"""Requests: validated values read from JSONL files or Python lists.

A JSONL line is either batchjax's own shape
    {"id", "prompt" | "prompt_token_ids" | "messages", "max_tokens", "temperature", ...}
or the OpenAI Batch API shape
    {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}.
A bad line becomes a `RequestError` naming its line and field; the other lines are unaffected.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from batchjax.structured import (StructuredSpec, StructuredSpecError, from_response_format,
                                 parse_structured)

# Seeds key a JAX PRNG as uint32, so larger values would silently alias.
_MAX_SEED = 2**32
MAX_LOGPROBS = 20  # the most alternatives a token's logprobs list (the step computes this many)
MAX_SAMPLES = 64  # the most samples `n` asks of one prompt
# Positions are int32: no request asks for more (one that asks past its model's context is
# cut there, finish reason "length").
MAX_TOKENS_LIMIT = 2**31 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's chat roles
LOGPROBS_MODES = ("raw", "processed")


class InputFormat(enum.Enum):
    """The shape of an input file; results are written back in the matching shape."""

    NATIVE = "native"
    OPENAI_CHAT = "openai_chat"  # url /v1/chat/completions
    OPENAI_COMPLETIONS = "openai_completions"  # url /v1/completions

    @property
    def is_openai(self) -> bool:
        return self is not InputFormat.NATIVE


_OPENAI_URLS = {
    "/v1/chat/completions": InputFormat.OPENAI_CHAT,
    "/v1/completions": InputFormat.OPENAI_COMPLETIONS,
}


class InvalidRequestError(ValueError):
    """A request value that cannot run; `field` names the offending field."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `"max_tokens": true` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _token_ids(field: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidRequestError(field, "must be a list of integers")
    # The common case in C-speed builtins (a long prompt has thousands of ids); exact types,
    # so bools (an int subclass) take the element-wise check below and are refused there.
    if set(map(type, value)) <= {int} and (not value or min(value) >= 0):
        return tuple(value)
    if not all(_is_int(t) and t >= 0 for t in value):
        raise InvalidRequestError(field, "must hold only non-negative integers")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch their filter off. The
    filters apply after temperature in the order top-k, top-p, min-p. Randomness is keyed by
    (seed, sample index, position) only, so a request's output never depends on its batch.

    `n` samples of one prompt; `logprobs` k returns each generated token's logprob and its k
    most likely alternatives, of the model's distribution (`logprobs_mode` "raw") or of the
    one sampled from, after temperature, filters and grammar ("processed");
    `prompt_logprobs` k does the same for every prompt token after the first, and with it
    `max_tokens` may be 0 (score the prompt, generate nothing). `structured` constrains the
    output to a JSON schema, regex, choice or grammar (`batchjax.structured`).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise InvalidRequestError(name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        least = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_tokens) or not least <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequestError(
                "max_tokens", f"must be an integer in [1, {MAX_TOKENS_LIMIT}]" + (
                    "" if least else " (0 with prompt_logprobs: score without generating)"))
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise InvalidRequestError("n", f"must be an integer in [1, {MAX_SAMPLES}]")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise InvalidRequestError("logprobs_mode", f"must be one of {', '.join(LOGPROBS_MODES)}")
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            try:
                object.__setattr__(self, "structured", parse_structured(self.structured))
            except StructuredSpecError as e:
                raise InvalidRequestError(
                    "structured" + (f".{e.field}" if e.field else ""), e.reason) from None
        if not _is_real(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", "must be a finite number >= 0")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", "must be a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError("top_k", "must be an integer >= 0 (0 = off)")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequestError("min_p", "must be a number in [0, 1]")
        if not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED:
            raise InvalidRequestError("seed", f"must be an integer in [0, {_MAX_SEED})")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", "must be true or false")
        # Normalise lists (JSON, Python callers) to tuples and ints to floats: values stay hashable.
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", float(self.min_p))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def generates(self) -> bool:
        """Whether the request generates tokens (max_tokens 0 only scores its prompt)."""
        return self.max_tokens > 0


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")


def _messages(field: str, value: Any) -> tuple[dict[str, str], ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InvalidRequestError(field, "must be a non-empty list of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(where, "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, "
                                                       f"got {role!r}"[:200])
        if isinstance(content, list):
            # OpenAI content parts: only text parts can reach a text-only model.
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequestError(f"{where}.content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidRequestError(f"{where}.content", "must be a string")
        messages.append({"role": role, "content": content})
    return tuple(messages)


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion to produce. Exactly one of prompt, prompt_token_ids, messages is set.

    `index` is the request's position in its input (JSONL: line number - 1), so results can be
    put back in input order, errors included. `output_len`, when a workload carries it, is the
    true output length a simulation replays instead of max_tokens. `sample_index` tells the
    samples of a request with `n` > 1 apart (it keys their randomness); a sample after the
    first runs under an index of its own and names its request's in `sample_of`.
    `score_from` (Python callers, `Engine.score`): the first prompt token whose logprob
    `prompt_logprobs` reports (default 1: all); the prompt before it may be shared.
    """

    id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    messages: tuple[dict[str, str], ...] | None
    sampling: SamplingParams
    index: int
    output_len: int | None = None
    sample_index: int = 0
    sample_of: int | None = None
    score_from: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidRequestError("id", "must be a non-empty string")
        given = [name for name in _PROMPT_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                given[1] if given else "prompt",
                "give exactly one of prompt, prompt_token_ids, messages"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt):
            raise InvalidRequestError("prompt", "must be a non-empty string")
        if self.prompt_token_ids is not None:
            ids = _token_ids("prompt_token_ids", self.prompt_token_ids)
            if not ids:
                raise InvalidRequestError("prompt_token_ids", "must not be empty")
            object.__setattr__(self, "prompt_token_ids", ids)
        if self.messages is not None:
            object.__setattr__(self, "messages", _messages("messages", self.messages))
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidRequestError("sampling", "must be a SamplingParams")
        if self.output_len is not None and (not _is_int(self.output_len) or self.output_len < 0):
            raise InvalidRequestError("output_len", "must be an integer >= 0")
        if not _is_int(self.sample_index) or not 0 <= self.sample_index < self.sampling.n:
            raise InvalidRequestError("sample_index", f"must be in [0, n = {self.sampling.n})")
        if self.score_from is not None and (
                not _is_int(self.score_from) or self.score_from < 1
                or self.sampling.prompt_logprobs is None):
            raise InvalidRequestError("score_from", "must be an integer >= 1, with prompt_logprobs")

    @property
    def input_index(self) -> int:
        """The position of the request in its input (a sample's, its request's)."""
        return self.index if self.sample_of is None else self.sample_of


@dataclasses.dataclass(frozen=True)
class RequestError:
    """An input line that cannot run. `id` is None when the line has no usable id of its own."""

    line: int
    id: str | None
    field: str | None
    message: str


def _sampling_from(obj: Mapping[str, Any], default: SamplingParams, prefix: str) -> SamplingParams:
    # null means "not given": OpenAI clients write `"stop": null` and the like.
    overrides = {name: obj[name] for name in _SAMPLING_FIELDS if obj.get(name) is not None}
    try:
        return dataclasses.replace(default, **overrides)
    except InvalidRequestError as e:
        raise InvalidRequestError(prefix + (e.field or ""), e.reason) from None


_NATIVE_FIELDS = frozenset({"id", *_PROMPT_FIELDS, *_SAMPLING_FIELDS, "output_len"})


def _parse_native(obj: Mapping[str, Any], index: int, default_id: str, strict: bool,
                  default_sampling: SamplingParams) -> Request:
    request_id = obj.get("id", default_id)
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError("id", "must be a non-empty string")
    if strict:
        if unknown := sorted(set(obj) - _NATIVE_FIELDS):
            raise InvalidRequestError(unknown[0], "unknown field (strict mode)")
    given = [name for name in _PROMPT_FIELDS if name in obj]
    if len(given) != 1:
        raise InvalidRequestError(given[1] if given else "prompt",
                                  "give exactly one of prompt, prompt_token_ids, messages")
    return Request(
        id=request_id,
        prompt=obj.get("prompt"),
        prompt_token_ids=obj.get("prompt_token_ids"),
        messages=obj.get("messages"),
        sampling=_sampling_from(obj, default_sampling, ""),
        index=index,
        output_len=obj.get("output_len"),
    )


_OPENAI_LINE_FIELDS = frozenset({"custom_id", "method", "url", "body"})
# `model` and `user` are accepted and ignored: the model is chosen for the whole run.
_OPENAI_BODY_FIELDS = frozenset({"model", "user", "stream", "max_completion_tokens",
                                 "top_logprobs", "response_format", *_SAMPLING_FIELDS})


def _openai_sampling_fields(body: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """The body's sampling fields in SamplingParams' terms: chat's `logprobs` is a switch with
    the count in `top_logprobs` (the completions endpoint gives the count in `logprobs`), and
    `response_format` is a structured-output constraint."""
    fields = dict(body)
    if "max_completion_tokens" in body:
        if "max_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
            raise InvalidRequestError("body.max_completion_tokens", "conflicts with body.max_tokens")
        fields["max_tokens"] = body["max_completion_tokens"]
    if chat:
        wants = body.get("logprobs")
        if wants is not None and not isinstance(wants, bool):
            raise InvalidRequestError("body.logprobs", "must be true or false")
        top = body.get("top_logprobs")
        if top is not None and not wants:
            raise InvalidRequestError("body.top_logprobs", "needs body.logprobs = true")
        fields["logprobs"] = (0 if top is None else top) if wants else None
        if top is not None and (not _is_int(top) or not 0 <= top <= MAX_LOGPROBS):
            raise InvalidRequestError("body.top_logprobs",
                                      f"must be an integer in [0, {MAX_LOGPROBS}]")
    elif body.get("top_logprobs") is not None:
        raise InvalidRequestError("body.top_logprobs",
                                  "is a chat field; completions give the count in logprobs")
    if body.get("response_format") is not None:
        if body.get("structured") is not None:
            raise InvalidRequestError("body.response_format", "conflicts with body.structured")
        try:
            fields["structured"] = from_response_format(body["response_format"])
        except StructuredSpecError as e:
            raise InvalidRequestError(
                "body.response_format" + (f".{e.field}" if e.field else ""), e.reason) from None
    return fields


def _parse_openai(obj: Mapping[str, Any], index: int, strict: bool,
                  default_sampling: SamplingParams) -> tuple[Request, InputFormat]:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequestError("custom_id", "must be a non-empty string")
    if obj.get("method") != "POST":
        raise InvalidRequestError("method", 'must be "POST"')
    fmt = _OPENAI_URLS.get(obj.get("url"))  # type: ignore[arg-type]
    if fmt is None:
        raise InvalidRequestError("url", f"must be one of {sorted(_OPENAI_URLS)}")
    body = obj.get("body")
    if not isinstance(body, Mapping):
        raise InvalidRequestError("body", "must be an object")
    prompt_field = "messages" if fmt is InputFormat.OPENAI_CHAT else "prompt"
    if strict:
        if unknown := sorted(set(obj) - _OPENAI_LINE_FIELDS):
            raise InvalidRequestError(unknown[0], "unknown field (strict mode)")
        if unknown := sorted(set(body) - _OPENAI_BODY_FIELDS - {prompt_field}):
            raise InvalidRequestError(f"body.{unknown[0]}", "unknown field (strict mode)")
    if body.get("stream", False) is not False:
        raise InvalidRequestError("body.stream", "streaming has no meaning in a batch file")
    sampling_fields = _openai_sampling_fields(body, fmt is InputFormat.OPENAI_CHAT)
    if prompt_field not in body:
        raise InvalidRequestError(f"body.{prompt_field}", f"is required for {obj['url']}")
    prompt, prompt_token_ids, messages = None, None, None
    try:
        if fmt is InputFormat.OPENAI_CHAT:
            messages = _messages("body.messages", body["messages"])
        elif isinstance(body["prompt"], str):
            prompt = body["prompt"]
        else:
            # The completions endpoint also takes a prompt as one list of token ids.
            prompt_token_ids = _token_ids("body.prompt", body["prompt"])
        request = Request(id=custom_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                          messages=messages,
                          sampling=_sampling_from(sampling_fields, default_sampling, "body."),
                          index=index)
    except InvalidRequestError as e:
        if e.field is None or e.field.startswith("body."):
            raise
        raise InvalidRequestError(f"body.{e.field}", e.reason) from None
    return request, fmt


def _is_openai_shape(obj: Mapping[str, Any]) -> bool:
    return "custom_id" in obj or "body" in obj


def _parse_any(obj: Any, index: int, default_id: str, strict: bool,
               default_sampling: SamplingParams | None) -> tuple[Request, InputFormat]:
    if not isinstance(obj, Mapping):
        raise InvalidRequestError(None, "a request must be a JSON object")
    default_sampling = default_sampling or SamplingParams()
    if _is_openai_shape(obj):
        return _parse_openai(obj, index, strict, default_sampling)
    return _parse_native(obj, index, default_id, strict, default_sampling), InputFormat.NATIVE


def parse_request(obj: Mapping[str, Any], index: int, *, strict: bool = False,
                  default_sampling: SamplingParams | None = None) -> Request:
    """One request from a decoded JSON object in either shape.

    Raises InvalidRequestError (a ValueError) whose `field` names what is wrong. Fields a line
    leaves out take their values from `default_sampling`; a missing id becomes str(index + 1),
    the line number of a JSONL file.
    """
    return _parse_any(obj, index, str(index + 1), strict, default_sampling)[0]


def _declared_id(obj: Any) -> str | None:
    """The id a line gives itself, if it is usable, to report its error under."""
    if not isinstance(obj, Mapping):
        return None
    value = obj.get("custom_id") if _is_openai_shape(obj) else obj.get("id")
    return value if isinstance(value, str) and value else None


_UTF8_BOM = b"\xef\xbb\xbf"


def read_requests_jsonl(
    path: str | os.PathLike[str], *, strict: bool = False,
    default_sampling: SamplingParams | None = None,
) -> tuple[list[Request], list[RequestError], InputFormat]:
    """Reads every line of a JSONL file; bad lines become errors, never exceptions.

    The first valid line fixes the file's format; a line in another shape is an error,
    so results can be written back in one shape. Blank lines are skipped, CRLF line ends and a
    UTF-8 byte-order mark at the start of the file are accepted (a mark on a later line is
    not JSON). Line numbers start at 1 and a request's index is its line number - 1.
    """
    requests: list[Request] = []
    errors: list[RequestError] = []
    fmt: InputFormat | None = None
    first_line_of: dict[str, int] = {}
    # Binary lines split on b"\n" only: a stray "\r" inside a line must not split it in two.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(_UTF8_BOM):  # a file's byte-order mark
                raw = raw[len(_UTF8_BOM):]
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                errors.append(RequestError(line_no, None, None, f"not UTF-8: {e.reason} at byte {e.start}"))
                continue
            except json.JSONDecodeError as e:
                errors.append(RequestError(line_no, None, None, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            # The id an error is reported under: the line's own, or its line number when it
            # gives none (as for a valid line); None when another line already owns that id.
            report_id = _declared_id(obj)
            if isinstance(obj, Mapping) and not _is_openai_shape(obj) and "id" not in obj:
                report_id = str(line_no)
            if report_id in first_line_of:
                report_id = None
            try:
                request, line_fmt = _parse_any(obj, line_no - 1, str(line_no), strict, default_sampling)
                if fmt is not None and line_fmt is not fmt:
                    field = "url" if line_fmt.is_openai and fmt.is_openai else None
                    raise InvalidRequestError(field, f"line is in the {line_fmt.value} format but the "
                                                     f"file is in the {fmt.value} format")
                if request.id in first_line_of:
                    raise InvalidRequestError("id", f"duplicate id {request.id!r} (first on line "
                                                    f"{first_line_of[request.id]})")
            except InvalidRequestError as e:
                errors.append(RequestError(line_no, report_id, e.field, e.reason))
                if report_id is not None:
                    first_line_of[report_id] = line_no
                continue
            fmt = fmt or line_fmt
            first_line_of[request.id] = line_no
            requests.append(request)
    return requests, errors, fmt or InputFormat.NATIVE


def requests_from_python(
    items: Sequence[str | Mapping[str, Any] | Request],
    default_sampling: SamplingParams | None = None,
) -> list[Request]:
    """Requests for the Python API: prompts, JSON-like dicts, or Request values.

    A string is a prompt with id str(position); dict fields override `default_sampling`;
    indices become positions in `items`. Raises InvalidRequestError at the first bad item,
    since a Python caller can fix its list and call again.
    """
    if isinstance(items, (str, Mapping, Request)):
        raise InvalidRequestError(None, "give a list of requests, not a single one")
    default_sampling = default_sampling or SamplingParams()
    requests: list[Request] = []
    seen: set[str] = set()
    for position, item in enumerate(items):
        try:
            if isinstance(item, Request):
                request = dataclasses.replace(item, index=position)
            elif isinstance(item, str):
                request = Request(id=str(position), prompt=item, prompt_token_ids=None, messages=None,
                                  sampling=default_sampling, index=position)
            else:
                request = _parse_any(item, position, str(position), False, default_sampling)[0]
        except InvalidRequestError as e:
            raise InvalidRequestError(e.field, f"request {position}: {e.reason}") from None
        if request.id in seen:
            raise InvalidRequestError("id", f"request {position}: duplicate id {request.id!r}")
        seen.add(request.id)
        requests.append(request)
    return requests


def sample_requests(request: Request, first_free_index: int) -> list[Request]:
    """The samples after the first of a request with `n` > 1: `sample_index` 1..n-1, under
    indices `first_free_index`, ... (unused by any input), each naming its request in
    `sample_of`. The request itself is sample 0. They share the prompt, so the plan makes
    them a prefix group of degree n."""
    return [dataclasses.replace(request, sample_index=k, sample_of=request.index,
                                index=first_free_index + k - 1)
            for k in range(1, request.sampling.n)]
