"""Results and the output file: one JSON line per request, appended as requests finish.

The file doubles as the run's journal: a rerun with the same output path reads which ids are
done, tolerates the torn last line of a killed process, and appends the rest; `finalize`
rewrites it atomically in input order with every id exactly once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from batchjax.requests import InputFormat, RequestError


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob and the most likely tokens at its position (`top`, most likely
    first, as many as the request asked for). `argmax` is the most likely token there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    argmax: int

    def to_json(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "logprob": _finite(self.logprob),
                "top_logprobs": [{"token_id": t, "logprob": _finite(lp)} for t, lp in self.top]}


def _finite(x: float) -> float | None:
    # A token the processed distribution excludes has logprob -inf, which JSON cannot hold.
    return x if math.isfinite(x) else None


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one request. `error` is set (and finish_reason is "error") when it could not run.

    text is None for token-only requests (no tokenizer). token_ids holds every generated token,
    a final EOS or stop token included. `logprobs` (one per token of token_ids) and
    `prompt_logprobs` (one per prompt token, None for the first and for any not asked for)
    are set when the request asked for them. A request with `n` > 1 has its samples in
    `samples` (each a Result of its own, `index` its sample index); the fields above are the
    first sample's, completion_tokens the sum over all of them.
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
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    samples: tuple[Result, ...] | None = None
    # Set on one sample of a request with n > 1, before its samples are merged:
    # (the request's input index, this sample's index, n). Its own `index` is internal.
    sample: tuple[int, int, int] | None = None


def merge_samples(samples: Sequence[Result]) -> Result:
    """One request's result from its n samples, in sample order."""
    first = samples[0]
    return dataclasses.replace(
        first, index=first.sample[0], sample=None,
        completion_tokens=sum(s.completion_tokens for s in samples),
        cached_prompt_tokens=min(s.cached_prompt_tokens for s in samples),
        samples=tuple(dataclasses.replace(s, index=k, prompt_logprobs=None, sample=None)
                      for k, s in enumerate(samples)))


class SampleCollector:
    """Merges the samples of requests with `n` > 1: `wrap(on_result)` passes a request's
    result on once all of its samples are done (any other result at once), and `results`
    puts a finished job's results in input order, samples merged. Thread-safe: the replicas
    of a data-parallel job share one."""

    def __init__(self):
        self._pending: dict[int, dict[int, Result]] = {}
        self._lock = threading.Lock()

    def add(self, result: Result) -> Result | None:
        """The request's whole result once `result` completes it, else None."""
        if result.sample is None:
            return result
        index, k, n = result.sample
        with self._lock:
            got = self._pending.setdefault(index, {})
            got[k] = result
            if len(got) < n:
                return None
            del self._pending[index]
        return merge_samples([got[j] for j in range(n)])

    def wrap(self, on_result: Callable[[Result], None] | None) -> Callable[[Result], None] | None:
        if on_result is None:
            return None

        def whole(result: Result) -> None:
            if (merged := self.add(result)) is not None:
                on_result(merged)

        return whole

    @staticmethod
    def results(done: dict[int, Result]) -> list[Result]:
        """Every result of `done` (by internal index) in input order, samples merged."""
        out: dict[int, Result] = {}
        samples: dict[int, dict[int, Result]] = {}
        for r in done.values():
            if r.sample is None:
                out[r.index] = r
            else:
                samples.setdefault(r.sample[0], {})[r.sample[1]] = r
        for index, got in samples.items():
            out[index] = merge_samples([got[k] for k in sorted(got)])
        return [out[i] for i in sorted(out)]


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


def _openai_logprobs(logprobs, token_text) -> dict[str, Any]:
    """OpenAI's `choices[i].logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}
    (with each token's id besides, as `token_ids` is)."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id) if token_text is not None else ""
        return {"token": text, "logprob": _finite(logprob),
                "bytes": list(text.encode("utf-8")), "token_id": token_id}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}


def _openai_line(result: Result, fmt: InputFormat, model: str, token_text) -> dict[str, Any]:
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
    choices = []
    for k, sample in enumerate(result.samples or (result,)):
        choice: dict[str, Any] = {"index": k, "finish_reason": sample.finish_reason,
                                  "logprobs": None}
        if sample.logprobs is not None:
            choice["logprobs"] = _openai_logprobs(sample.logprobs, token_text)
        if chat:
            choice["message"] = {"role": "assistant", "content": sample.text}
        else:
            choice["text"] = sample.text
        # A token-level model has no text: the ids are the answer (an extension of the schema).
        choice["token_ids"] = list(sample.token_ids)
        choices.append(choice)
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{_stable_hex(result.id)}",
        "object": "chat.completion" if chat else "text_completion",
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
        },
    }
    if result.prompt_logprobs is not None:  # vLLM's extension of the schema
        body["prompt_logprobs"] = _prompt_logprobs_json(result)
    line["response"] = {"status_code": 200, "request_id": _stable_hex(result.id), "body": body}
    line["error"] = None
    return line


def _prompt_logprobs_json(result: Result) -> list[dict[str, Any] | None]:
    return [None if lp is None else lp.to_json() for lp in result.prompt_logprobs]


def _native_output(sample: Result) -> dict[str, Any]:
    out: dict[str, Any] = {"text": sample.text, "token_ids": list(sample.token_ids),
                           "finish_reason": sample.finish_reason}
    if sample.logprobs is not None:
        out["logprobs"] = [lp.to_json() for lp in sample.logprobs]
    return out


def to_output_line(result: Result, fmt: InputFormat, *, model: str = "batchjax",
                   token_text: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The JSON object written for `result`, in the shape of the input (`fmt`).

    `model` only appears in the OpenAI shape, whose response bodies carry a model name;
    `token_text` (a token id's text) fills the `token` fields of its logprobs.
    """
    if fmt.is_openai:
        return _openai_line(result, fmt, model, token_text)
    if result.error is not None:
        error: dict[str, Any] = {"message": result.error.message}
        if result.error.field is not None:
            error["field"] = result.error.field
        return {"id": result.id, "error": error}
    line: dict[str, Any] = {"id": result.id}
    if result.samples is None:
        line.update(_native_output(result))
    else:
        line["outputs"] = [{"index": k, **_native_output(s)} for k, s in enumerate(result.samples)]
    if result.prompt_logprobs is not None:
        line["prompt_logprobs"] = _prompt_logprobs_json(result)
    line["usage"] = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_prompt_tokens": result.cached_prompt_tokens,
    }
    return line


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


class OutputInUseError(RuntimeError):
    """Another live process holds the output file's lock."""


def _take_lock(lock_path: str) -> int:
    """An fd holding an exclusive flock on `lock_path`, which then names this process's pid.

    The kernel drops a flock when its process dies, however it dies: a lock file left by a
    killed run is free and taken over. Raises OutputInUseError while a live process holds it.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputInUseError(
                f"another run (process {owner}) is writing this output; wait for it to end or "
                f"choose another output (lock file {lock_path})") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last owner unlinked between our open and our flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


class ResultsJournal:
    """The output file, appended one fsynced line per finished request; resumable after a kill.

    On disk: each result is one line, written with a single `write` that ends in its newline,
    then `flush` and `fsync`, before `append` returns; so after a kill at any instant the file
    is whole lines followed by at most one torn line without its newline. Opening reads what an
    earlier run wrote: the text after the last newline is a torn line (even when it happens to
    parse), cut off the file, and its request runs again; damage anywhere else is not ours to
    repair and raises ValueError. `finalize` writes every line in input order to `PATH.tmp`,
    fsyncs it, renames it over the output (atomic) and fsyncs the directory; a kill before the
    rename leaves the journal as it was, a kill after it the final file, and both resume. A
    write or rename that fails (a full disk, a refused rename) removes `PATH.tmp`, leaves the
    journal as it was and raises the OSError; a rerun finalizes it.

    One writer: opening takes an exclusive lock on `PATH.lock` (holding the writer's pid) until
    `close`; a second run on the same output raises OutputInUseError while the first lives.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: InputFormat, *, model: str = "batchjax",
                 token_text: Callable[[int], str] | None = None):
        self._path = os.fspath(path)
        self._lock_path = self._path + ".lock"
        self._lock_fd = _take_lock(self._lock_path)
        try:
            self._open(fmt, model, token_text)
        except BaseException:
            self._release()
            raise

    def _open(self, fmt, model, token_text) -> None:
        self._fmt = fmt
        self._model = model
        self.token_text = token_text  # may be set once the tokenizer is loaded
        self._lines: dict[str, bytes] = {}  # id -> its line, newline included
        self._error_ids: set[str] = set()
        good_end = self._read_existing()
        # Unbuffered: a line is on disk or not once `append` returns or raises, and a failed
        # write leaves nothing behind for a later flush to retry.
        self._file = open(self._path, "ab", buffering=0)
        self._end = good_end
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
        line = json.dumps(to_output_line(result, self._fmt, model=self._model,
                                         token_text=self.token_text),
                          ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            written = 0
            while written < len(line):  # a raw write may take part of it
                written += self._file.write(line[written:])
            self._sync()
        except OSError:
            # A full disk, say: cut the part that was written, so the file stays whole lines.
            try:
                self._file.truncate(self._end)
            except OSError:
                pass
            raise
        self._end += len(line)
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
        try:
            with open(tmp_path, "wb") as tmp:
                for request_id in ids_in_input_order:
                    tmp.write(self._lines[request_id])
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_path, self._path)
        except OSError:
            # A full disk or a refused rename: the journal itself is untouched and a rerun
            # finalizes it, so the half-made copy only takes room and is removed.
            try:
                os.remove(tmp_path)
            except OSError:
                pass
            self._file = open(self._path, "ab", buffering=0)
            raise
        # The file is now the final one: the journal follows it before anything else can fail.
        self._lines = {i: self._lines[i] for i in ids_in_input_order}
        self._error_ids &= set(self._lines)
        self._file = open(self._path, "ab", buffering=0)
        self._end = self._file.tell()
        # The rename itself is durable only once the directory entry is.
        dir_fd = os.open(os.path.dirname(os.path.abspath(self._path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        self._file.close()
        self._release()

    def _release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self._lock_path)  # while still holding it: see _take_lock
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> ResultsJournal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
