"""The malformed-input corpus (tests/data/malformed_lines.jsonl): every bad line gets an error
naming its field, odd but valid lines run, and every other line of the file completes."""

import base64
import json
import os

import pytest

from batchjax.requests import read_requests_jsonl

CORPUS = os.path.join(os.path.dirname(__file__), "data", "malformed_lines.jsonl")
HUGE_BYTES = 10 * 2**20


def _corpus(file: str) -> list[dict]:
    with open(CORPUS) as f:
        return [e for e in map(json.loads, f) if e["file"] == file]


def _raw(entry: dict) -> bytes:
    if "bytes_b64" in entry:
        return base64.b64decode(entry["bytes_b64"])
    if entry.get("make") == "huge_line":
        return json.dumps({"id": "huge_line", "prompt": "word " * (HUGE_BYTES // 5)}).encode()
    return entry["text"].encode()


def _good(i: int, fmt: str) -> bytes:
    if fmt == "openai":
        return json.dumps({"custom_id": f"good{i}", "method": "POST",
                           "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": f"hello {i}"}],
                                    "max_tokens": 2}}).encode()
    return json.dumps({"id": f"good{i}", "prompt": f"hello {i}", "max_tokens": 2}).encode()


def _write(path, entries, fmt):
    """The corpus lines, each followed by a good line; returns (line number of each entry,
    line numbers of the good lines). A first-line entry (the BOM) stays first."""
    lines, where, good = [], [], []
    for i, entry in enumerate(entries):
        lines.append(_raw(entry))
        where.append(len(lines))
        lines.append(_good(i, fmt))
        good.append(len(lines))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return where, good


@pytest.fixture(scope="module")
def engine(tiny_llama_tok_dir):
    from batchjax.engine.engine import Engine

    return Engine(str(tiny_llama_tok_dir), page_size=8, kv_budget_mb=4.0,
                  max_tokens_per_step=256, progress=False)


def test_the_corpus_has_thirty_kinds_and_more():
    kinds = [e["kind"] for f in ("native", "strict", "openai") for e in _corpus(f)]
    assert len(kinds) == len(set(kinds))
    assert sum(1 for f in ("native", "strict", "openai") for e in _corpus(f)
               if e["outcome"] == "error") >= 30


@pytest.mark.parametrize("file", ["native", "strict", "openai"])
def test_every_bad_line_names_its_field_and_the_rest_completes(engine, tmp_path, file):
    entries = _corpus(file)
    path = tmp_path / "in.jsonl"
    where, good = _write(path, entries, file)
    requests, errors, _ = read_requests_jsonl(path, strict=file == "strict")
    results = engine.generate(requests)
    by_line = {e.line: ("error", e.field, e.message) for e in errors}
    for request, result in zip(requests, results):
        line = request.index + 1
        assert line not in by_line, f"line {line} is both a request and a reader error"
        by_line[line] = (("error", result.error.field, result.error.message)
                         if result.error is not None else ("ok", None, result.finish_reason))
    for entry, line in zip(entries, where):
        got = by_line.get(line, ("skipped", None, None))
        assert got[0] == entry["outcome"], (entry["kind"], got)
        if entry["outcome"] == "error":
            assert got[1] == entry["field"], (entry["kind"], got)
            assert got[2], entry["kind"]
    for line in good:
        assert by_line.get(line, ("missing",))[0] == "ok", (line, by_line.get(line))
