"""Finished requests become results on a thread of their own: detokenization and the
journal's writes leave the step loop, and nothing about the results changes."""

import threading

import pytest

from batchjax.engine import engine as engine_module
from batchjax.engine.engine import Engine
from batchjax.models.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def engine(tiny_llama_tok_dir):
    return Engine(str(tiny_llama_tok_dir), page_size=4, kv_budget_mb=4.0,
                  max_tokens_per_step=32, progress=False)


def _requests(stop_every_other: bool = True):
    requests = []
    for i in range(6):
        r = {"id": f"r{i}", "prompt": f"Question {i}: what comes next?", "max_tokens": 10,
             "ignore_eos": True, "temperature": 1.0, "seed": i}
        if stop_every_other and i % 2:
            r["stop"] = ["e"]  # common in text, so some of them end on it
        requests.append(r)
    return requests


def _text_alone(tokenizer, token_ids):
    detok = IncrementalDetokenizer(tokenizer)
    return "".join(detok.add(t) for t in token_ids)


def test_requests_without_stop_strings_are_detokenized_off_the_loop(engine, monkeypatch):
    calls = []  # the thread of every token detokenized
    add = IncrementalDetokenizer.add

    def spy(self, token_id):
        calls.append(threading.current_thread().name)
        return add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", spy)
    results = engine.generate(_requests())
    loop = threading.current_thread().name
    during = list(calls)  # the checks below detokenize too
    assert set(during) == {loop, "results"}
    by_stop = {r.id: bool(i % 2) for i, r in enumerate(results)}
    assert any(r.finish_reason == "stop" for r in results if by_stop[r.id])
    for r in results:
        if not by_stop[r.id]:  # its text, all of it, from the results thread
            assert r.text == _text_alone(engine.tokenizer, r.token_ids)
    # The loop's thread detokenized only as many tokens as the stop-string requests sampled.
    stop_tokens = sum(len(r.token_ids) for r in results if by_stop[r.id])
    assert during.count(loop) == stop_tokens


def test_deferred_text_equals_the_text_taken_in_the_loop(engine, monkeypatch):
    deferred = engine.generate(_requests(stop_every_other=False))
    # Every request detokenized inside the loop, as before the results thread.
    live = engine_module._Live.__init__

    def inline(self, request, *args, **kwargs):
        live(self, request, *args, **kwargs)
        self.detok = IncrementalDetokenizer(self.tokenizer)

    monkeypatch.setattr(engine_module._Live, "__init__", inline)
    inline_results = engine.generate(_requests(stop_every_other=False))
    assert [(r.token_ids, r.text, r.finish_reason) for r in deferred] == [
        (r.token_ids, r.text, r.finish_reason) for r in inline_results]
    assert all(r.text for r in deferred)


def test_results_reach_on_result_from_the_results_thread_in_finishing_order(engine):
    seen = []
    results = engine.generate(_requests(), on_result=lambda r: seen.append(
        (threading.current_thread().name, r.id)))
    assert {name for name, _ in seen} == {"results"}
    assert sorted(i for _, i in seen) == sorted(r.id for r in results)
    assert engine.last_metrics["time_to_first_result_s"] is not None


def test_a_failing_on_result_stops_the_job_with_its_own_error(engine):
    handed = []

    def on_result(result):
        if handed:
            raise OSError(28, "No space left on device")
        handed.append(result.id)

    with pytest.raises(OSError, match="No space left"):
        engine.generate(_requests(), on_result=on_result)
    assert len(handed) == 1
