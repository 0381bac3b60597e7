"""Requests: validation names the field, bad lines never affect good ones, both file shapes read."""

import json

import pytest

from batchjax.requests import (InputFormat, InvalidRequestError, Request, SamplingParams,
                               parse_request, read_requests_jsonl, requests_from_python)


def _write(tmp_path, lines: list) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "field,value",
    [("max_tokens", -1), ("max_tokens", 0), ("max_tokens", True), ("max_tokens", 3.0),
     ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
     ("top_k", -2), ("min_p", 2.0), ("seed", -1), ("seed", 2**32), ("stop", [""]), ("stop", 5),
     ("stop_token_ids", [-1]), ("stop_token_ids", [True]), ("ignore_eos", 1)],
)
def test_bad_sampling_values_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field
    assert e.value.reason and str(e.value) == f"{field}: {e.value.reason}"


def test_sampling_values_are_normalised_to_hashable_tuples():
    params = SamplingParams(stop="###", stop_token_ids=[5, 6], temperature=1)
    assert params.stop == ("###",) and params.stop_token_ids == (5, 6)
    assert isinstance(params.temperature, float)
    hash(params)


def test_a_request_has_exactly_one_prompt_field():
    with pytest.raises(InvalidRequestError) as e:
        parse_request({"id": "a", "prompt": "x", "prompt_token_ids": [1]}, 0)
    assert e.value.field == "prompt_token_ids"
    with pytest.raises(InvalidRequestError) as e:
        parse_request({"id": "a"}, 0)
    assert e.value.field == "prompt"


def test_bad_lines_become_errors_and_good_lines_are_unaffected(tmp_path):
    path = _write(tmp_path, [
        {"id": "a", "prompt": "hello", "max_tokens": 4, "stop": "\n", "temperature": 0.7, "seed": 3},
        "{not json",
        {"id": "b"},
        {"id": "a", "prompt": "again"},
        {"id": "c", "prompt_token_ids": []},
        {"id": "d", "prompt": "x", "max_tokens": -5},
        {"id": "e", "prompt": "x", "top_p": 0},
        {"id": "f", "prompt": "x", "max_tokens": True},
        {"id": "g", "messages": [{"role": "user"}]},
        "",
        {"prompt_token_ids": [1, 2, 3], "stop_token_ids": [9], "output_len": 5},
        [1, 2],
    ])
    requests, errors, fmt = read_requests_jsonl(path)
    assert fmt is InputFormat.NATIVE
    assert [(r.id, r.index) for r in requests] == [("a", 0), ("11", 10)]
    a, no_id = requests
    assert a.prompt == "hello" and a.sampling == SamplingParams(max_tokens=4, stop=("\n",),
                                                                temperature=0.7, seed=3)
    assert no_id.prompt_token_ids == (1, 2, 3) and no_id.output_len == 5
    assert [(e.line, e.id, e.field) for e in errors] == [
        (2, None, None), (3, "b", "prompt"), (4, None, "id"), (5, "c", "prompt_token_ids"),
        (6, "d", "max_tokens"), (7, "e", "top_p"), (8, "f", "max_tokens"),
        (9, "g", "messages[0].content"), (12, None, None),
    ]
    assert "line 1" in errors[2].message


def test_strict_mode_rejects_unknown_fields(tmp_path):
    path = _write(tmp_path, [{"id": "a", "prompt": "x", "temprature": 0.5}])
    requests, errors, _ = read_requests_jsonl(path)
    assert len(requests) == 1 and not errors
    requests, errors, _ = read_requests_jsonl(path, strict=True)
    assert not requests and errors[0].field == "temprature"


def _openai(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_batch_lines_are_read_and_remember_their_format(tmp_path):
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    path = _write(tmp_path, [
        _openai("q1", {"model": "m", "messages": chat, "max_completion_tokens": 7, "stop": None,
                       "temperature": 0.5, "top_p": 0.9}),
        _openai("q2", {"model": "m", "messages": chat, "max_tokens": -1}),
        _openai("q3", {"model": "m", "prompt": "text"}, url="/v1/completions"),
        _openai("q4", {"model": "m", "messages": chat}, url="/v1/embeddings"),
        {"id": "native", "prompt": "x"},
        _openai("q5", {"model": "m", "messages": chat, "n": 65}),
    ])
    requests, errors, fmt = read_requests_jsonl(path)
    assert fmt is InputFormat.OPENAI_CHAT
    assert [r.id for r in requests] == ["q1"]
    q1 = requests[0]
    assert q1.messages[1] == {"role": "user", "content": "Hi there"}
    assert (q1.sampling.max_tokens, q1.sampling.temperature, q1.sampling.top_p) == (7, 0.5, 0.9)
    assert [(e.id, e.field) for e in errors] == [
        ("q2", "body.max_tokens"), ("q3", "url"), ("q4", "url"), ("native", None), ("q5", "body.n")]


def test_openai_completions_take_text_or_token_ids(tmp_path):
    path = _write(tmp_path, [
        _openai("t", {"prompt": "once upon"}, url="/v1/completions"),
        _openai("ids", {"prompt": [5, 6, 7], "max_tokens": 3}, url="/v1/completions"),
    ])
    requests, errors, fmt = read_requests_jsonl(path)
    assert fmt is InputFormat.OPENAI_COMPLETIONS and not errors
    assert requests[0].prompt == "once upon" and requests[1].prompt_token_ids == (5, 6, 7)


def test_default_sampling_fills_what_a_line_leaves_out(tmp_path):
    path = _write(tmp_path, [{"id": "a", "prompt": "x", "top_k": 5}])
    requests, _, _ = read_requests_jsonl(path, default_sampling=SamplingParams(max_tokens=64, seed=9))
    assert requests[0].sampling == SamplingParams(max_tokens=64, seed=9, top_k=5)


def test_python_items_become_requests_in_order():
    given = Request(id="mine", prompt=None, prompt_token_ids=(4, 5), messages=None,
                    sampling=SamplingParams(), index=99)
    requests = requests_from_python(
        ["first prompt", {"id": "chat", "messages": [{"role": "user", "content": "hi"}]}, given],
        default_sampling=SamplingParams(max_tokens=8))
    assert [(r.id, r.index) for r in requests] == [("0", 0), ("chat", 1), ("mine", 2)]
    assert requests[0].sampling.max_tokens == 8 and requests[1].sampling.max_tokens == 8
    with pytest.raises(InvalidRequestError) as e:
        requests_from_python(["a", {"prompt": "b", "temperature": -1}])
    assert e.value.field == "temperature" and "request 1" in str(e.value)
    with pytest.raises(InvalidRequestError, match="duplicate"):
        requests_from_python([{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(InvalidRequestError):
        requests_from_python("a single prompt")


def test_openai_eval_fields_map_to_sampling(tmp_path):
    chat = [{"role": "user", "content": "Hi"}]
    path = _write(tmp_path, [
        _openai("lp", {"messages": chat, "logprobs": True, "top_logprobs": 3, "n": 4}),
        _openai("plain", {"messages": chat, "logprobs": False}),
        _openai("on", {"messages": chat, "logprobs": True}),
        _openai("top_only", {"messages": chat, "top_logprobs": 2}),
        _openai("too_many", {"messages": chat, "logprobs": True, "top_logprobs": 21}),
        _openai("json", {"messages": chat, "response_format": {"type": "json_object"}}),
        _openai("text", {"messages": chat, "response_format": {"type": "text"}}),
        _openai("bad_format", {"messages": chat, "response_format": {"type": "yaml"}}),
    ])
    requests, errors, _ = read_requests_jsonl(path)
    by_id = {r.id: r.sampling for r in requests}
    assert (by_id["lp"].logprobs, by_id["lp"].n) == (3, 4)
    assert by_id["plain"].logprobs is None and by_id["on"].logprobs == 0
    assert by_id["json"].structured.kind == "json_object"
    assert by_id["text"].structured is None
    assert [(e.id, e.field) for e in errors] == [
        ("top_only", "body.top_logprobs"), ("too_many", "body.top_logprobs"),
        ("bad_format", "body.response_format.type")]


def test_openai_completions_give_the_logprobs_count(tmp_path):
    path = _write(tmp_path, [
        _openai("c", {"prompt": "x", "logprobs": 5}, url="/v1/completions"),
        _openai("bad", {"prompt": "x", "logprobs": 99}, url="/v1/completions"),
    ])
    requests, errors, _ = read_requests_jsonl(path)
    assert requests[0].sampling.logprobs == 5
    assert [(e.id, e.field) for e in errors] == [("bad", "body.logprobs")]


def test_structured_field_errors_name_the_key():
    for value, field in [({"json": {"type": "nonsense"}}, "structured.json"),
                         ({"regex": "(unclosed"}, "structured.regex"),
                         ({"choice": []}, "structured.choice"),
                         ({"json": {}, "regex": "a"}, "structured.regex")]:
        with pytest.raises(InvalidRequestError) as e:
            parse_request({"prompt": "x", "structured": value}, 0)
        assert e.value.field == field, (value, e.value)
