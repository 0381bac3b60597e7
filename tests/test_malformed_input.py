"""The malformed-input corpus (tests/data/malformed_lines.jsonl): every bad line gets an error
naming its field, odd but valid lines run, and every other line of the file completes.

Each corpus line is written between good lines, read as run_batch reads a file and run through
the engine (`experiments.faults.run_corpus`, which the fault campaign runs too)."""

import pytest

from experiments import faults

FILES = ("native", "strict", "openai")


@pytest.fixture(scope="module")
def engine(tiny_llama_tok_dir):
    from batchjax.engine.engine import Engine

    return Engine(str(tiny_llama_tok_dir), page_size=8, kv_budget_mb=4.0,
                  max_tokens_per_step=256, progress=False)


def test_the_corpus_has_thirty_kinds_and_more():
    entries = [e for f in FILES for e in faults.corpus_entries(f)]
    assert len({e["kind"] for e in entries}) == len(entries)
    assert sum(e["outcome"] == "error" for e in entries) >= 30
    assert {e["outcome"] for e in entries} == {"error", "ok", "skipped"}


@pytest.mark.parametrize("file", FILES)
def test_every_bad_line_names_its_field_and_the_rest_completes(engine, tmp_path, file):
    report = faults.run_corpus(engine, str(tmp_path), file)
    assert len(report) == len(faults.corpus_entries(file)) + 1  # and "every good line"
    assert [x for x in report if not x["ok"]] == []
