"""Structured output: every constrained completion parses and validates, bad constraints are
per-request errors, and constraining one request changes no other request's output."""

import json
import re

import jsonschema
import numpy as np
import pytest

from batchjax.engine.grammar import (GrammarCompiler, allow_all_row, apply_token_bitmask,
                                     num_words)
from batchjax.requests import InvalidRequestError, parse_request, read_requests_jsonl
from batchjax.structured import (StructuredSpec, StructuredSpecError, from_response_format,
                                 parse_structured)

WORDS = ("alpha", "beta", "gamma", "delta", "kiwi", "plum", "red", "blue", "yes", "no",
         "caf\u00e9", "a b", 'quote"d', "back\\slash", "x", "42")


# -- constraints, generated ------------------------------------------------------------------


def _string_schema(rng):
    kind = rng.integers(4)
    if kind == 0:
        return {"type": "string", "maxLength": int(rng.integers(1, 12))}
    if kind == 1:
        return {"type": "string", "enum": [str(w) for w in rng.choice(WORDS, 3, replace=False)]}
    if kind == 2:
        return {"type": "string", "pattern": "^[a-z]{2,6}$"}
    return {"type": "string", "minLength": 2, "maxLength": int(rng.integers(2, 8))}


def _value_schema(rng, depth):
    kind = rng.integers(6 if depth < 2 else 4)
    if kind == 0:
        return _string_schema(rng)
    if kind == 1:
        lo = int(rng.integers(-50, 50))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 900))}
    if kind == 2:
        return {"type": "boolean"}
    if kind == 3:
        return {"enum": [int(rng.integers(0, 9)), "n/a", None]}
    if kind == 4:
        return {"type": "array", "items": _string_schema(rng), "minItems": 1,
                "maxItems": int(rng.integers(1, 4))}
    return _object_schema(rng, depth + 1)


def _object_schema(rng, depth=0):
    names = [f"k{i}" for i in rng.choice(20, int(rng.integers(1, 4)), replace=False)]
    return {"type": "object", "properties": {n: _value_schema(rng, depth) for n in names},
            "required": names, "additionalProperties": False}


def _regex(rng):
    pieces = ["[a-z]{1,5}", "[0-9]{2,4}", "(foo|bar|baz)", "-", "[A-Z][a-z]{0,3}", "(ab)+?",
              "x?y", r"\d{3}"]
    parts = [pieces[i] for i in rng.choice(len(pieces), int(rng.integers(1, 4)))]
    return "".join(parts).replace("(ab)+?", "(ab){1,3}")


def constraints(count, seed=0):
    """`count` structured values with a checker each: (value, check(text) -> None)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = ("json", "regex", "choice")[i % 3]
        if kind == "json":
            schema = _object_schema(rng)

            def check(text, schema=schema):
                jsonschema.validate(json.loads(text), schema)

            out.append(({"json": schema}, check))
        elif kind == "regex":
            pattern = _regex(rng)

            def check(text, pattern=pattern):
                assert re.fullmatch(pattern, text), (pattern, text)

            out.append(({"regex": pattern}, check))
        else:
            choices = [str(w) for w in rng.choice(WORDS, int(rng.integers(2, 6)), replace=False)]

            def check(text, choices=choices):
                assert text in choices, (choices, text)

            out.append(({"choice": choices}, check))
    return out


# -- the specs -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, field", [
    ({"json": {"type": "nonsense"}}, "json"),
    ({"json": "{not json"}, "json"),
    ({"json": ["a list"]}, "json"),
    ({"regex": "(unclosed"}, "regex"),
    ({"regex": ""}, "regex"),
    ({"choice": []}, "choice"),
    ({"choice": ["ok", ""]}, "choice[1]"),
    ({"choice": "not a list"}, "choice"),
    ({"grammar": "start: ( unclosed"}, "grammar"),
    ({"grammar": "nostart: \"a\""}, "grammar"),
    ({"yaml": "a: 1"}, "yaml"),
    ({"json": {}, "regex": "a"}, "regex"),
    ({}, ""),
    ("a string", ""),
])
def test_a_bad_structured_value_names_its_key(value, field):
    with pytest.raises(StructuredSpecError) as e:
        parse_structured(value)
    assert e.value.field == field
    assert e.value.reason


@pytest.mark.parametrize("value, field", [
    ({"type": "yaml"}, "type"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": 3}}}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
     "json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}, "json_schema.extra"),
    ({"type": "json_object", "json_schema": {}}, "json_schema"),
])
def test_a_bad_response_format_names_its_key(value, field):
    with pytest.raises(StructuredSpecError) as e:
        from_response_format(value)
    assert e.value.field == field


def test_specs_are_values_shared_by_equal_constraints():
    a = parse_structured({"json": {"type": "object", "properties": {"b": {}, "a": {}}}})
    b = parse_structured({"json": '{"type": "object", "properties": {"b": {}, "a": {}}}'})
    assert a == b and hash(a) == hash(b)
    assert json.loads(a.value)["properties"] == {"b": {}, "a": {}}  # the caller's key order
    assert parse_structured({"choice": ["x", "y", "x"]}) == StructuredSpec("choice", ("x", "y"))
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}).kind == "json_object"
    assert (from_response_format({"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer"}, "strict": True}})
        == parse_structured({"json": {"type": "integer"}}))


def test_request_fields_name_the_structured_key():
    request = parse_request({"prompt": "x", "structured": {"regex": "[0-9]+"}}, 0)
    assert request.sampling.structured == StructuredSpec("regex", "[0-9]+")
    with pytest.raises(InvalidRequestError) as e:
        parse_request({"prompt": "x", "structured": {"grammar": "start: ("}}, 0)
    assert e.value.field == "structured.grammar"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "response_format": {
                "type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}}
    with pytest.raises(InvalidRequestError) as e:
        parse_request(line, 0)
    assert e.value.field == "body.response_format.json_schema.schema"


# -- the device half -------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 128])
def test_apply_token_bitmask_equals_a_bit_by_bit_reference(vocab):
    rng = np.random.default_rng(vocab)
    words = num_words(vocab) + (vocab % 2)  # a wider mask is allowed; its extra bits ignored
    bitmask = rng.integers(-2**31, 2**31, size=(5, words), dtype=np.int64).astype(np.int32)
    bitmask[0] = -1
    bitmask[1] = 0
    bitmask[2, : num_words(vocab)] = allow_all_row(vocab)
    logits = rng.normal(size=(5, vocab)).astype(np.float32)
    got = np.asarray(apply_token_bitmask(logits, bitmask))
    unsigned = bitmask.view(np.uint32)
    for r in range(5):
        for t in range(vocab):
            allowed = (int(unsigned[r, t // 32]) >> (t % 32)) & 1
            assert got[r, t] == (logits[r, t] if allowed else -np.inf)
    np.testing.assert_array_equal(got[2], logits[2])


# -- the host half, walked with random tokens ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


def _allowed(row, vocab):
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def _walk(compiler, matcher, rng, max_tokens=300):
    """Random allowed tokens until EOS; the tokens before EOS."""
    row = np.zeros(compiler.num_words, np.int32)
    tokens = []
    eos = set(compiler.eos_token_ids)
    for _ in range(max_tokens):
        matcher.fill_bitmask(row)
        allowed = _allowed(row, compiler.vocab_size)
        assert allowed.size, "a live grammar allows some token"
        ending = [t for t in allowed if t in eos]
        if ending and (len(ending) == allowed.size or rng.random() < 0.3):
            matcher.consume(ending[0])
            assert matcher.is_finished
            return tokens
        choices = [t for t in allowed if t not in eos]
        token = int(rng.choice(choices))
        matcher.consume(token)
        tokens.append(token)
    raise AssertionError(f"no end after {max_tokens} tokens")


def test_random_walks_through_few_hundred_constraints_all_validate(compiler, tokenizer):
    rng = np.random.default_rng(1)
    for value, check in constraints(300):
        spec = parse_structured(value)
        matcher = compiler.compile(spec)
        tokens = _walk(compiler, matcher, rng)
        check(tokenizer.decode(tokens, skip_special_tokens=False))


def test_matcher_rejects_a_disallowed_token_and_stays_put(compiler, tokenizer):
    matcher = compiler.compile(parse_structured({"choice": ["yes", "no"]}))
    (bad,) = tokenizer.encode("maybe", add_special_tokens=False)[:1]
    with pytest.raises(ValueError):
        matcher.consume(bad)
    with pytest.raises(ValueError):
        matcher.consume(compiler.eos_token_ids[0])  # nothing matched yet: EOS not allowed
    fork = matcher.fork()
    for token in tokenizer.encode("yes", add_special_tokens=False):
        matcher.consume(token)
    assert matcher.is_accepting and not fork.is_accepting
    row = np.zeros(compiler.num_words, np.int32)
    matcher.fill_bitmask(row)
    assert set(_allowed(row, compiler.vocab_size)) <= set(compiler.eos_token_ids)
    matcher.reset()
    assert not matcher.is_accepting


def test_fill_bitmasks_in_parallel_equals_one_row_at_a_time(compiler):
    matchers = [compiler.compile(parse_structured(v)) for v, _ in constraints(12, seed=3)]
    one = np.zeros((len(matchers) + 2, compiler.num_words), np.int32)
    many = np.full_like(one, 7)
    for i, m in enumerate(matchers):
        m.fill_bitmask(one[i + 1])
    compiler.fill_bitmasks([(m, i + 1) for i, m in enumerate(matchers)], many)
    np.testing.assert_array_equal(many[1:-1], one[1:-1])
    assert (many[0] == 7).all() and (many[-1] == 7).all()  # rows not named are untouched


def test_a_model_narrower_than_its_tokenizer_never_allows_missing_ids(tokenizer):
    vocab = tokenizer.vocab_size - 40
    narrow = GrammarCompiler(tokenizer, vocab)
    matcher = narrow.compile(parse_structured({"regex": "[a-z ]{1,40}"}))
    row = np.zeros(narrow.num_words, np.int32)
    matcher.fill_bitmask(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert bits[vocab:].sum() == 0 and bits[:vocab].sum() > 100


# -- in the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama_tok_dir):
    from batchjax.engine.engine import Engine

    return Engine(str(tiny_llama_tok_dir), page_size=8, kv_budget_mb=4.0,
                  max_tokens_per_step=256, progress=False)


PROMPTS = ("Fill in the form: ", "Answer with one word. ", "Give the code: ")
FREE = {"id": "free", "prompt": "Tell me anything at all.", "max_tokens": 12}


def _job(cases, sampled):
    requests = []
    for i, (value, _) in enumerate(cases):
        request = {"id": f"c{i}", "prompt": PROMPTS[i % 3] + str(i), "max_tokens": 160,
                   "structured": value}
        if sampled:
            request.update(temperature=1.0, seed=i)
        requests.append(request)
    return requests


_RUNS: dict = {}


def _checked_job(engine, sampled, tmp_path):
    """A constrained job through the JSONL reader and `engine` (cached per `sampled`), with
    its checks: (the requests, results by id)."""
    if sampled in _RUNS:
        return _RUNS[sampled]
    cases = constraints(36, seed=10 + sampled)
    free = dict(FREE, **({"temperature": 1.0, "seed": 5} if sampled else {}))
    lines = _job(cases, sampled)
    bad = {"id": "bad", "prompt": "x", "structured": {"grammar": "start: ("}}
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [free, *lines[:18], bad, *lines[18:]]))
    requests, errors, _ = read_requests_jsonl(path)
    assert [(e.id, e.field) for e in errors] == [("bad", "structured.grammar")]
    by_id = {r.id: r for r in engine.generate(requests)}
    for i, (_, check) in enumerate(cases):
        result = by_id[f"c{i}"]
        assert result.error is None and result.finish_reason == "stop", result
        check(result.text)
    assert engine.last_metrics["overlap"] and engine.last_metrics["compiled_after_warmup"] == 0
    (alone,) = engine.generate([free])
    assert by_id["free"].token_ids == alone.token_ids and by_id["free"].text == alone.text
    _RUNS[sampled] = requests, by_id
    return requests, by_id


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_engine_outputs_all_validate_and_free_requests_are_unchanged(engine, sampled, tmp_path):
    _checked_job(engine, sampled, tmp_path)


@pytest.fixture(scope="module")
def lockstep_engine(tiny_llama_tok_dir):
    from batchjax.engine.engine import Engine

    return Engine(str(tiny_llama_tok_dir), page_size=8, kv_budget_mb=4.0,
                  max_tokens_per_step=256, progress=False, overlap=False)


def test_masks_filled_while_the_forward_runs_change_no_output(engine, lockstep_engine,
                                                              tmp_path):
    """Overlapped, a step's forward pass runs before the tokens of the step before are back
    and its masks are filled meanwhile; the outputs are those of the lock-step loop."""
    requests, overlapped = _checked_job(engine, True, tmp_path)
    lockstep = {r.id: r for r in lockstep_engine.generate(requests)}
    assert not lockstep_engine.last_metrics["overlap"]
    assert {i: r.token_ids for i, r in lockstep.items()} == {
        i: r.token_ids for i, r in overlapped.items()}


def test_a_constrained_step_is_launched_before_the_tokens_of_the_step_before_return(
        engine, monkeypatch):
    events = []
    step = engine.step
    for name in ("forward", "sample", "fetch"):
        original = getattr(step, name)

        def wrapped(*args, _name=name, _original=original):
            events.append(_name)
            return _original(*args)

        monkeypatch.setattr(step, name, wrapped)
    engine.generate([{"id": "a", "prompt": "Pick: ", "max_tokens": 8,
                      "structured": {"regex": "[a-z]{6}"}}])
    # forward(0) sample(0), then forward(1) before step 0's tokens are fetched, its masks
    # (sample(1)) after them, and so on: one step in flight while the host fills masks.
    assert events[:5] == ["forward", "sample", "forward", "fetch", "sample"], events
    assert events.count("forward") == events.count("sample") >= 3
