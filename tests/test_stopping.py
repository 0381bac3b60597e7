"""Finish logic: EOS, stop ids, stop strings across tokens, max_tokens and a full context."""

import pytest

from batchjax.engine.stopping import StopChecker
from batchjax.requests import SamplingParams

EOS = 2


def _run(checker: StopChecker, pieces: list[tuple[int, str | None]]):
    decisions = [checker.update(token, text) for token, text in pieces]
    assert all(d is None for d in decisions[:-1]), "finished before the last token"
    return decisions[-1]


def test_eos_stops_and_adds_no_text():
    checker = StopChecker(SamplingParams(max_tokens=10), (EOS,), 100, 5)
    decision = _run(checker, [(10, "Hello"), (11, " world"), (EOS, "</s>")])
    assert (decision.finish_reason, decision.stop_reason) == ("stop", EOS)
    assert decision.text == "Hello world"
    assert decision.num_tokens == 3


def test_ignore_eos_runs_to_max_tokens_but_stop_ids_still_stop():
    checker = StopChecker(SamplingParams(max_tokens=3, ignore_eos=True), (EOS,), 100, 5)
    decision = _run(checker, [(EOS, ""), (EOS, ""), (EOS, "")])
    assert decision.finish_reason == "length"
    checker = StopChecker(SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=(7,)), (EOS,), 100, 5)
    decision = _run(checker, [(EOS, ""), (7, "x")])
    assert (decision.finish_reason, decision.stop_reason, decision.num_tokens) == ("stop", 7, 2)


def test_max_tokens_and_full_context_end_with_length():
    decision = _run(StopChecker(SamplingParams(max_tokens=2), (EOS,), 100, 5), [(10, "a"), (11, "b")])
    assert (decision.finish_reason, decision.text, decision.num_tokens) == ("length", "ab", 2)
    # 8 prompt tokens in a context of 10 leave room for 2 tokens, whatever max_tokens says.
    decision = _run(StopChecker(SamplingParams(max_tokens=50), (EOS,), 10, 8), [(10, "a"), (11, "b")])
    assert (decision.finish_reason, decision.num_tokens) == ("length", 2)


def test_a_stop_on_the_last_allowed_token_is_a_stop():
    decision = _run(StopChecker(SamplingParams(max_tokens=2), (EOS,), 100, 5), [(10, "a"), (EOS, "")])
    assert decision.finish_reason == "stop"


def test_prompt_filling_the_context_is_rejected():
    with pytest.raises(ValueError, match="prompt"):
        StopChecker(SamplingParams(), (EOS,), 10, 10)


def test_stop_string_spanning_tokens_cuts_the_text_before_it():
    checker = StopChecker(SamplingParams(max_tokens=20, stop=("###",)), (EOS,), 100, 5)
    assert checker.update(10, "The answer #") is None
    assert checker.emitted_text == "The answer "  # "#" may start the stop string
    assert checker.update(11, "#") is None
    assert checker.emitted_text == "The answer "
    decision = checker.update(12, "# more")
    assert (decision.finish_reason, decision.stop_reason) == ("stop", "###")
    assert decision.text == "The answer "
    assert decision.num_tokens == 3


def test_held_back_text_is_released_when_it_is_not_a_stop_string():
    checker = StopChecker(SamplingParams(max_tokens=20, stop=("END",)), (EOS,), 100, 5)
    checker.update(10, "weekEN")
    assert checker.emitted_text == "week"
    checker.update(11, "Dx")  # "ENDx" contains END: stop
    assert checker.finished.text == "week"
    checker = StopChecker(SamplingParams(max_tokens=20, stop=("END",)), (EOS,), 100, 5)
    checker.update(10, "weekE")
    checker.update(11, "ast")
    assert checker.emitted_text == "weekEast"
    decision = checker.update(EOS, "")
    assert decision.text == "weekEast"


def test_the_earliest_of_several_stop_strings_wins():
    checker = StopChecker(SamplingParams(max_tokens=20, stop=("world", "lo w")), (EOS,), 100, 5)
    decision = _run(checker, [(10, "hel"), (11, "lo world")])
    assert (decision.text, decision.stop_reason) == ("hel", "lo w")


def test_length_end_keeps_text_that_only_looked_like_a_stop_start():
    decision = _run(StopChecker(SamplingParams(max_tokens=2, stop=("\n\n",)), (EOS,), 100, 5),
                    [(10, "a"), (11, "b\n")])
    assert (decision.finish_reason, decision.text) == ("length", "ab\n")


def test_emitted_text_only_grows_and_is_a_prefix_of_the_final_text():
    pieces = ["Q", ":", " x", " <", "|", "end", "|", ">", " tail"]
    checker = StopChecker(SamplingParams(max_tokens=50, stop=("<|end|>", "Q: y")), (EOS,), 100, 5)
    seen = []
    for token, piece in enumerate(pieces, start=10):
        decision = checker.update(token, piece)
        seen.append(checker.emitted_text)
        if decision:
            break
    assert decision.text == "Q: x "
    assert all(a == b[: len(a)] for a, b in zip(seen, seen[1:]))
    assert all(decision.text.startswith(s) for s in seen)


def test_token_only_requests_have_no_text():
    decision = _run(StopChecker(SamplingParams(max_tokens=2), (EOS,), 100, 5), [(10, None), (11, None)])
    assert decision.text is None and decision.num_tokens == 2


def test_update_after_finishing_is_an_error():
    checker = StopChecker(SamplingParams(max_tokens=1), (EOS,), 100, 5)
    checker.update(10, "a")
    with pytest.raises(RuntimeError):
        checker.update(11, "b")
