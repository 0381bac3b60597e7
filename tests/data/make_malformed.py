"""Writes malformed_lines.jsonl: one bad (or merely odd) input line per kind, with what must
become of it. Run from the repository root: python -m tests.data.make_malformed

Each corpus line is {"kind", "outcome", "field", "text" | "bytes_b64" | "make"}:
- outcome "error": the line gets an error naming `field` (null: the line as a whole, e.g. not
  JSON) and every other line still runs; "ok": the line runs; "skipped": no request at all.
- "text" is the input line without its newline; "bytes_b64" the raw bytes (invalid UTF-8, a
  BOM, CRLF); "make" names a line too big to store, built by the test
  (tests/test_malformed_input.py).
Lines that only the model can judge (token ids outside its vocabulary, a prompt longer than its
context) are errors from the engine, not the reader; the test runs both.
"""

import base64
import json
import os

NAN, INF = float("nan"), float("inf")


def _line(obj) -> str:
    return json.dumps(obj, allow_nan=True)


def corpus() -> list[dict]:
    chat = [{"role": "user", "content": "hi"}]
    out = []

    def add(kind, outcome, field, text=None, raw=None, make=None):
        entry = {"kind": kind, "outcome": outcome, "field": field}
        if text is not None:
            entry["text"] = text
        if raw is not None:
            entry["bytes_b64"] = base64.b64encode(raw).decode()
        if make is not None:
            entry["make"] = make
        out.append(entry)

    def bad(kind, field, **obj):
        add(kind, "error", field, _line({"id": kind, **obj}))

    add("bom_first_line", "ok", None,
        raw=b"\xef\xbb\xbf" + json.dumps({"id": "bom_first_line", "prompt": "hi",
                                          "max_tokens": 2}).encode())
    add("invalid_json", "error", None, '{"id": "invalid_json", "prompt": ')
    add("json_array", "error", None, '[{"id": "json_array", "prompt": "hi"}]')
    add("json_number", "error", None, "42")
    add("json_string", "error", None, '"just a prompt"')
    add("json_null", "error", None, "null")
    add("invalid_utf8", "error", None, raw=b'{"id": "invalid_utf8", "prompt": "caf\xe9"}')
    add("bom_later_line", "error", None,
        raw=b"\xef\xbb\xbf" + json.dumps({"id": "bom_later_line", "prompt": "hi"}).encode())
    add("crlf", "ok", None,
        raw=json.dumps({"id": "crlf", "prompt": "hi", "max_tokens": 2}).encode() + b"\r")
    # A bare CR is JSON whitespace, not a line end: the line must stay one line.
    add("cr_inside_line", "ok", None,
        raw=b'{"id": "cr_inside_line",\r"prompt": "hi", "max_tokens": 2}')
    add("empty_line", "skipped", None, "")
    add("blank_line", "skipped", None, "   \t ")
    add("huge_line", "error", "prompt", make="huge_line")  # 10 MB of prompt: past the context
    bad("missing_prompt", "prompt", max_tokens=3)
    bad("empty_prompt", "prompt", prompt="")
    bad("two_prompts", "messages", prompt="a", messages=chat)
    bad("prompt_not_string", "prompt", prompt=["a", "b"])
    add("id_not_string", "error", "id", _line({"id": 7, "prompt": "hi"}))
    add("id_empty", "error", "id", _line({"id": "", "prompt": "hi"}))
    bad("max_tokens_string", "max_tokens", prompt="hi", max_tokens="5")
    bad("max_tokens_negative", "max_tokens", prompt="hi", max_tokens=-3)
    bad("max_tokens_float", "max_tokens", prompt="hi", max_tokens=2.5)
    bad("max_tokens_huge", "max_tokens", prompt="hi", max_tokens=10**12)
    bad("max_tokens_past_int32", "max_tokens", prompt="hi", max_tokens=2**31)  # positions are int32
    add("max_tokens_past_context", "ok", None,  # runs, cut at the model's context
        _line({"id": "max_tokens_past_context", "prompt": "hi", "max_tokens": 100_000}))
    bad("temperature_string", "temperature", prompt="hi", temperature="hot")
    bad("temperature_nan", "temperature", prompt="hi", temperature=NAN)
    bad("temperature_infinite", "temperature", prompt="hi", temperature=INF)
    bad("temperature_negative", "temperature", prompt="hi", temperature=-0.5)
    bad("top_p_zero", "top_p", prompt="hi", top_p=0.0)
    bad("top_p_above_one", "top_p", prompt="hi", top_p=1.5)
    add("top_p_one", "ok", None,  # the upper end of (0, 1]: the filter off
        _line({"id": "top_p_one", "prompt": "hi", "max_tokens": 2, "top_p": 1.0}))
    bad("top_k_float", "top_k", prompt="hi", top_k=2.5)
    bad("min_p_negative", "min_p", prompt="hi", min_p=-0.1)
    bad("seed_past_64_bits", "seed", prompt="hi", seed=2**64)
    bad("seed_past_32_bits", "seed", prompt="hi", seed=2**32)  # seeds key a uint32 PRNG
    bad("seed_negative", "seed", prompt="hi", seed=-1)
    bad("seed_string", "seed", prompt="hi", seed="42")
    bad("stop_number", "stop", prompt="hi", stop=5)
    bad("stop_token_ids_strings", "stop_token_ids", prompt="hi", stop_token_ids=["x"])
    bad("ignore_eos_string", "ignore_eos", prompt="hi", ignore_eos="yes")
    bad("logprobs_too_many", "logprobs", prompt="hi", logprobs=21)
    bad("n_too_many", "n", prompt="hi", n=65)
    bad("structured_bad_regex", "structured.regex", prompt="hi", structured={"regex": "(a"})
    bad("token_ids_negative", "prompt_token_ids", prompt_token_ids=[5, -1])
    bad("token_ids_floats", "prompt_token_ids", prompt_token_ids=[5, 6.5])
    bad("token_ids_empty", "prompt_token_ids", prompt_token_ids=[])
    bad("token_ids_outside_vocab", "prompt_token_ids", prompt_token_ids=[5, 10**7])
    bad("messages_unknown_role", "messages[0].role",
        messages=[{"role": "wizard", "content": "hi"}])
    bad("messages_content_number", "messages[0].content",
        messages=[{"role": "user", "content": 5}])
    bad("messages_not_list", "messages", messages="hi")
    bad("prompt_past_context", "prompt", prompt="word " * 2000)
    add("duplicate_id_first", "ok", None, _line({"id": "dup", "prompt": "hi", "max_tokens": 2}))
    add("duplicate_id_second", "error", "id", _line({"id": "dup", "prompt": "again"}))
    add("openai_line_in_native_file", "error", None, _line(
        {"custom_id": "openai_line_in_native_file", "method": "POST",
         "url": "/v1/chat/completions", "body": {"messages": chat}}))
    return out


def strict_corpus() -> list[dict]:
    """Lines for a --strict run (the native format): unknown fields are errors."""
    return [
        {"kind": "unknown_field_strict", "outcome": "error", "field": "colour",
         "text": _line({"id": "unknown_field_strict", "prompt": "hi", "colour": "red"})},
    ]


def openai_corpus() -> list[dict]:
    """Lines of an OpenAI Batch file (its first line fixes the format)."""
    chat = [{"role": "user", "content": "hi"}]

    def line(custom_id, **fields):
        return _line({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                      **fields})

    return [
        {"kind": "openai_good", "outcome": "ok", "field": None,
         "text": line("openai_good", body={"messages": chat, "max_tokens": 2})},
        {"kind": "openai_wrong_url", "outcome": "error", "field": "url", "text": _line(
            {"custom_id": "openai_wrong_url", "method": "POST", "url": "/v1/embeddings",
             "body": {"messages": chat}})},
        {"kind": "openai_missing_body", "outcome": "error", "field": "body",
         "text": line("openai_missing_body")},
        {"kind": "openai_wrong_method", "outcome": "error", "field": "method", "text": _line(
            {"custom_id": "openai_wrong_method", "method": "GET", "url": "/v1/chat/completions",
             "body": {"messages": chat}})},
        {"kind": "native_line_in_openai_file", "outcome": "error", "field": None,
         "text": _line({"id": "native_line_in_openai_file", "prompt": "hi"})},
    ]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "malformed_lines.jsonl"), "w") as f:
        for section, entries in (("native", corpus()), ("strict", strict_corpus()),
                                 ("openai", openai_corpus())):
            for entry in entries:
                f.write(json.dumps({"file": section, **entry}) + "\n")


if __name__ == "__main__":
    main()
