"""Results and the output file: one JSON line per request, appended as requests finish.

The file doubles as the run's journal: a rerun with the same output path reads which ids are
done, tolerates the torn last line of a killed process, and appends the rest; `finalize`
rewrites it atomically in input order with every id exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from batchjax.requests import InputFormat, RequestError


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one request. `error` is set (and finish_reason is "error") when it could not run.

    text is None for token-only requests (no tokenizer). token_ids holds every generated token,
    a final EOS or stop token included.
    """

    id: str
    index: int
    text: str | None
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    error: RequestError | None


def error_key(error: RequestError) -> str:
    """The id an input error is written under: its own, else "line-N" (no usable id)."""
    return error.id if error.id is not None else f"line-{error.line}"


def error_result(error: RequestError) -> Result:
    """The result line of an input line that could not become a request."""
    return Result(id=error_key(error), index=error.line - 1, text=None, token_ids=(),
                  finish_reason="error", prompt_tokens=0, completion_tokens=0,
                  cached_prompt_tokens=0, error=error)


def _stable_hex(request_id: str) -> str:
    # OpenAI-shaped ids are derived from the request id so reruns write identical files.
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:24]


def _openai_line(result: Result, fmt: InputFormat, model: str) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"batch_req_{_stable_hex(result.id)}", "custom_id": result.id}
    if result.error is not None:
        line["response"] = {
            "status_code": 400,
            "request_id": _stable_hex(result.id),
            "body": {"error": {"message": result.error.message, "type": "invalid_request_error",
                               "param": result.error.field, "code": None}},
        }
        line["error"] = None
        return line
    chat = fmt is InputFormat.OPENAI_CHAT
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    # A token-level model has no text: the ids are the answer (an extension of the schema).
    choice["token_ids"] = list(result.token_ids)
    line["response"] = {
        "status_code": 200,
        "request_id": _stable_hex(result.id),
        "body": {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{_stable_hex(result.id)}",
            "object": "chat.completion" if chat else "text_completion",
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
            },
        },
    }
    line["error"] = None
    return line


def to_output_line(result: Result, fmt: InputFormat, *, model: str = "batchjax") -> dict[str, Any]:
    """The JSON object written for `result`, in the shape of the input (`fmt`).

    `model` only appears in the OpenAI shape, whose response bodies carry a model name.
    """
    if fmt.is_openai:
        return _openai_line(result, fmt, model)
    if result.error is not None:
        error: dict[str, Any] = {"message": result.error.message}
        if result.error.field is not None:
            error["field"] = result.error.field
        return {"id": result.id, "error": error}
    return {
        "id": result.id,
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cached_prompt_tokens": result.cached_prompt_tokens,
        },
    }


def _is_error_line(line: dict[str, Any]) -> bool:
    if "custom_id" in line:
        return line.get("error") is not None or (line.get("response") or {}).get(
            "status_code") != 200
    return line.get("error") is not None


def _line_id(line: Any) -> str:
    if not isinstance(line, dict):
        raise ValueError("a result line must be a JSON object")
    request_id = line.get("custom_id") if "custom_id" in line else line.get("id")
    if not isinstance(request_id, str):
        raise ValueError("a result line without a string id")
    return request_id


class ResultsJournal:
    """The output file, appended one fsynced line per finished request; resumable after a kill.

    Opening reads what an earlier run wrote. A last line without its newline, or one that does
    not parse, is what a killed process leaves: it is cut off the file and its request runs
    again. Damage anywhere else is not ours to repair and raises ValueError.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: InputFormat, *, model: str = "batchjax"):
        self._path = os.fspath(path)
        self._fmt = fmt
        self._model = model
        self._lines: dict[str, bytes] = {}  # id -> its line, newline included
        self._error_ids: set[str] = set()
        good_end = self._read_existing()
        self._file = open(self._path, "ab")
        if self._file.tell() != good_end:
            self._file.truncate(good_end)
            self._sync()

    def _read_existing(self) -> int:
        """Loads finished lines; returns the byte length of the intact part of the file."""
        if not os.path.exists(self._path):
            return 0
        with open(self._path, "rb") as f:
            data = f.read()
        # Each line goes out in one write ending in its newline, so only the text after the
        # last newline can be torn; it is dropped even when it happens to parse.
        intact = data[: data.rfind(b"\n") + 1]
        for line_no, raw in enumerate(intact.split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            try:
                parsed = json.loads(raw)
                request_id = _line_id(parsed)
            except ValueError as e:
                raise ValueError(f"{self._path}: line {line_no} is damaged ({e}) and is not the "
                                 "last line; refusing to resume over it") from None
            self._lines.setdefault(request_id, raw + b"\n")
            if _is_error_line(parsed):
                self._error_ids.add(request_id)
        return len(intact)

    @property
    def path(self) -> str:
        return self._path

    @property
    def finished_ids(self) -> frozenset[str]:
        return frozenset(self._lines)

    @property
    def num_errors(self) -> int:
        """Lines in the file that are errors, whichever run wrote them."""
        return len(self._error_ids)

    def error_key(self, error: RequestError) -> str:
        return error_key(error)

    def append(self, result: Result) -> None:
        """Writes one result and makes it durable before returning."""
        if result.id in self._lines:
            raise ValueError(f"result {result.id!r} is already in {self._path}")
        line = json.dumps(to_output_line(result, self._fmt, model=self._model),
                          ensure_ascii=False).encode("utf-8") + b"\n"
        self._file.write(line)
        self._sync()
        self._lines[result.id] = line
        if result.error is not None:
            self._error_ids.add(result.id)

    def append_error(self, error: RequestError) -> None:
        self.append(error_result(error))

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def finalize(self, ids_in_input_order: Sequence[str]) -> None:
        """Rewrites the file atomically: exactly `ids_in_input_order`, each once, in that order.

        Lines for ids outside the input (an output file reused for other input) are dropped.
        """
        missing = [i for i in ids_in_input_order if i not in self._lines]
        if missing:
            raise ValueError(f"{len(missing)} requests have no result yet, e.g. {missing[:3]}")
        if len(set(ids_in_input_order)) != len(ids_in_input_order):
            raise ValueError("ids_in_input_order repeats an id")
        self._file.close()
        tmp_path = f"{self._path}.tmp"
        with open(tmp_path, "wb") as tmp:
            for request_id in ids_in_input_order:
                tmp.write(self._lines[request_id])
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, self._path)
        # The rename itself is durable only once the directory entry is.
        dir_fd = os.open(os.path.dirname(os.path.abspath(self._path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._lines = {i: self._lines[i] for i in ids_in_input_order}
        self._error_ids &= set(self._lines)
        self._file = open(self._path, "ab")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsJournal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
