"""Structured output: the constraint a request's text must satisfy, read and checked up front.

A request asks for structured output with batchjax's own field
    "structured": {"json": SCHEMA} | {"regex": R} | {"choice": [S, ...]} | {"grammar": LARK}
or with OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", ...}).
Either becomes a `StructuredSpec`: a frozen, hashable value, so requests that share a schema
share one compiled grammar, which `to_llguidance_grammar` writes out for the engine's matcher
(batchjax/engine/grammar.py). Each constraint is compiled here once, without a tokenizer, so a
bad schema, regex or grammar is rejected when the request is read, naming the key that holds it.

JSON is generated on one line with Python's separators (`{"a": 1, "b": [2, 3]}`): free
whitespace would let a model pad its answer with blank lines until it runs out of tokens. A
schema's own `"x-guidance"` options (llguidance's, e.g. `{"whitespace_flexible": true}`) override
that.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
import llguidance

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# The keys of the native "structured" object; json_object is reached through response_format.
_NATIVE_KEYS = ("json", "regex", "choice", "grammar")
_NATIVE_LIST = ", ".join(_NATIVE_KEYS)
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type":"object"}'
_DESCRIBE_CHARS = 60


class StructuredSpecError(ValueError):
    """A structured-output value that cannot be used. `field` is the dotted path of the offending
    key inside the structured field ("json", "json_schema.schema", "" for the field itself)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class StructuredSpec:
    """One constraint on a completion's text.

    kind "json": `value` is the JSON schema as compact JSON text, its keys in the caller's order
    (the order properties are generated in); "regex": the pattern, matched in full; "choice": a
    tuple of distinct strings, one of which is the whole text; "grammar": a Lark grammar in
    llguidance's dialect (rule `start`); "json_object": any JSON object, `value` None.
    """

    kind: str
    value: str | tuple[str, ...] | None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredSpecError(
                "", f"unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "json_object":
            ok = self.value is None
        elif self.kind == "choice":
            ok = isinstance(self.value, tuple) and bool(self.value) and all(
                isinstance(c, str) and c for c in self.value)
        else:
            ok = isinstance(self.value, str) and bool(self.value)
        if not ok:
            raise StructuredSpecError("", f"invalid value for kind {self.kind!r}: {self.value!r}")

    def describe(self) -> str:
        """A one-line summary for logs and error messages, e.g. `regex /[0-9]{4}/`."""
        if self.kind == "json_object":
            return "any JSON object"
        if self.kind == "choice":
            text = f"choice of {len(self.value)}: " + ", ".join(json.dumps(c) for c in self.value)
        elif self.kind == "regex":
            text = f"regex /{self.value}/"
        elif self.kind == "json":
            text = f"JSON schema {self.value}"
        else:
            text = f"Lark grammar {' '.join(self.value.split())}"
        return text if len(text) <= _DESCRIBE_CHARS else text[: _DESCRIBE_CHARS - 3] + "..."

    def to_llguidance_grammar(self) -> str:
        """The grammar, in llguidance's serialised form, that `llguidance.LLMatcher` compiles."""
        if self.kind in ("json", "json_object"):
            schema = self.value if self.kind == "json" else _ANY_OBJECT
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            # JSON string literals are Lark string literals: quotes, backslashes and control
            # characters come out escaped, everything else as itself.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.value)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(self.value)


def _checked(spec: StructuredSpec, field: str) -> StructuredSpec:
    """`spec`, once llguidance has compiled its grammar (without a tokenizer)."""
    error = llguidance.LLMatcher.validate_grammar(spec.to_llguidance_grammar())
    if error:
        raise StructuredSpecError(field, error.strip())
    return spec


def _json_spec(field: str, schema: Any) -> StructuredSpec:
    """A "json" spec from a schema given as an object or as JSON text, checked against its
    metaschema and by llguidance."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredSpecError(field, f"is not valid JSON: {e}") from None
    if not isinstance(schema, Mapping):
        raise StructuredSpecError(field, "must be a JSON schema object (or its JSON text)")
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StructuredSpecError(field, f"must hold only JSON values: {e}") from None
    schema = json.loads(text)  # plain dicts and lists, whatever mappings the caller passed
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise StructuredSpecError(
            field, f"is not a valid JSON schema: {e.message} (at {e.json_path})") from None
    return _checked(StructuredSpec("json", text), field)


def _text_spec(kind: str, value: Any) -> StructuredSpec:
    if not isinstance(value, str) or not value:
        raise StructuredSpecError(kind, "must be a non-empty string")
    return _checked(StructuredSpec(kind, value), kind)


def _choice_spec(value: Any) -> StructuredSpec:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise StructuredSpecError("choice", "must be a non-empty list of non-empty strings")
    for i, choice in enumerate(value):
        if not isinstance(choice, str) or not choice:
            raise StructuredSpecError(f"choice[{i}]", "must be a non-empty string")
    return _checked(StructuredSpec("choice", tuple(dict.fromkeys(value))), "choice")


def parse_structured(value: Any) -> StructuredSpec:
    """The spec of a native `"structured"` field: an object with exactly one of the keys
    json (a schema object or its JSON text), regex, choice (a list of strings), grammar (Lark).

    Raises StructuredSpecError naming the offending key.
    """
    if not isinstance(value, Mapping):
        raise StructuredSpecError("", f"must be an object with one of the keys {_NATIVE_LIST}")
    for key in value:
        if key not in _NATIVE_KEYS:
            raise StructuredSpecError(str(key), f"unknown key; expected one of {_NATIVE_LIST}")
    if len(value) != 1:
        given = list(value)
        raise StructuredSpecError(
            given[1] if given else "",
            f"give exactly one of {_NATIVE_LIST}" + (f" (got {', '.join(given)})" if given else ""),
        )
    (kind, body), = value.items()
    if kind == "json":
        return _json_spec("json", body)
    if kind == "choice":
        return _choice_spec(body)
    return _text_spec(kind, body)


_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")


def from_response_format(value: Any) -> StructuredSpec | None:
    """The spec of an OpenAI `response_format`, or None for `{"type": "text"}`.

    `{"type": "json_object"}` asks for any JSON object; `{"type": "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}}` for the schema, always enforced whatever
    `strict` says. Raises StructuredSpecError naming the offending key ("type",
    "json_schema.schema", ...).
    """
    if not isinstance(value, Mapping):
        raise StructuredSpecError("", "must be an object with a type")
    kind = value.get("type")
    if kind not in _RESPONSE_FORMAT_TYPES:
        raise StructuredSpecError("type", f"must be one of {', '.join(_RESPONSE_FORMAT_TYPES)}")
    allowed = ("type", "json_schema") if kind == "json_schema" else ("type",)
    for key in value:
        if key not in allowed:
            raise StructuredSpecError(str(key), f"unknown key for type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object", None)
    body = value.get("json_schema")
    if not isinstance(body, Mapping):
        raise StructuredSpecError("json_schema", "must be an object with a schema")
    for key in body:
        if key not in _JSON_SCHEMA_KEYS:
            expected = ", ".join(_JSON_SCHEMA_KEYS)
            raise StructuredSpecError(f"json_schema.{key}", f"unknown key; expected {expected}")
    for key in ("name", "description"):
        if key in body and not isinstance(body[key], str):
            raise StructuredSpecError(f"json_schema.{key}", "must be a string")
    if "strict" in body and not isinstance(body["strict"], (bool, type(None))):
        raise StructuredSpecError("json_schema.strict", "must be true or false")
    if "schema" not in body:
        raise StructuredSpecError("json_schema.schema", "is required")
    return _json_spec("json_schema.schema", body["schema"])
