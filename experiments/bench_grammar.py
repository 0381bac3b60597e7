"""Per-token cost of grammar masks: llguidance (what batchjax uses), outlines-core and xgrammar.

    python -m experiments.bench_grammar [--model=smollm2-135m] [--walks=20] [--warmup_walks=3]
        [--seed=0] [--out=out/bench/grammar/results.json]

Each library compiles the same constraints for the model's tokenizer: a JSON schema (an object
with a bounded string, a bounded integer, an enum, an array of strings, a boolean and a number,
generated on one line), a date regex, a phone-number regex and a choice of four labels. Then a
walk computes the next-token mask, takes a random allowed token (seeded) and repeats until it
takes EOS. Only the mask computation is timed, over `--walks` walks after `--warmup_walks`
untimed ones, each walk on a fresh matcher of the compiled grammar. `compile_ms` is the
compilation, `first_mask_us` the first mask after it (llguidance builds its lexer lazily, so
part of its compilation lands there). A library that cannot run records why.

Last, `--batch_rows` llguidance matchers of the JSON schema are walked in lockstep, to compare
filling their rows one by one with `GrammarCompiler.fill_bitmasks` (llguidance's thread pool).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time

import numpy as np
from absl import app, flags

from batchjax.engine.grammar import GrammarCompiler, num_words
from batchjax.models.registry import load_tokenizer
from batchjax.models.tokenizer import Tokenizer, _byte_alphabet
from batchjax.structured import StructuredSpec, parse_structured

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model spec whose tokenizer is used.")
_WALKS = flags.DEFINE_integer("walks", 20, "Timed walks per library and constraint.")
_WARMUP = flags.DEFINE_integer("warmup_walks", 3, "Untimed walks before the timed ones.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "A walk stops after this many tokens.")
_BATCH_ROWS = flags.DEFINE_integer("batch_rows", 64, "Matchers in the lockstep batch (0: skip).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the token choices.")
_OUT = flags.DEFINE_string("out", "out/bench/grammar/results.json", "JSON report.")

_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role", "tags", "active", "score"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "json_object_schema": parse_structured({"json": _SCHEMA}),
    "regex_date": parse_structured({"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
    "regex_phone": parse_structured({"regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}),
    "choice_4": parse_structured({"choice": ["positive", "negative", "neutral", "mixed"]}),
}


class _Llguidance:
    """batchjax's own path: `GrammarCompiler` and `Matcher` over llguidance."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.compiler = GrammarCompiler(tokenizer, vocab_size)

    def compile(self, spec: StructuredSpec):
        self.compiler.compile(spec)  # compiles and caches the grammar
        return spec

    def new(self, compiled):
        return self.compiler.compile(compiled)

    def fill(self, matcher, row: np.ndarray) -> None:
        matcher.fill_bitmask(row)

    def advance(self, matcher, token: int) -> None:
        matcher.consume(token)


class _Xgrammar:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        import xgrammar

        self.xgr = xgrammar
        encoded = [""] * vocab_size
        for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            if i < vocab_size:
                encoded[i] = token
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL,
                                      vocab_size=vocab_size,
                                      stop_token_ids=list(tokenizer.eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info)

    def compile(self, spec: StructuredSpec):
        if spec.kind == "json":
            return self.compiler.compile_json_schema(spec.value, any_whitespace=False,
                                                     separators=(", ", ": "))
        if spec.kind == "regex":
            return self.compiler.compile_regex(spec.value)
        return self.compiler.compile_grammar(
            "root ::= " + " | ".join(json.dumps(c) for c in spec.value))

    def new(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, row: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(row[None])  # numpy through DLPack, no torch needed

    def advance(self, matcher, token: int) -> None:
        if not matcher.accept_token(token):
            raise ValueError(f"xgrammar rejected token {token}")


class _OutlinesCore:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        import outlines_core

        self.oc = outlines_core
        # outlines-core takes each token as its bytes; special tokens (and EOS) stay out.
        to_byte = {c: b for b, c in _byte_alphabet().items()}
        special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()
                   if t.special}
        tokens: dict[bytes, list[int]] = {}
        for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            if i < vocab_size and token not in special and i not in tokenizer.eos_token_ids:
                spelled = (bytes(to_byte[c] for c in token) if set(token) <= to_byte.keys()
                           else token.encode())
                tokens.setdefault(spelled, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_ids[0], tokens)

    def compile(self, spec: StructuredSpec):
        if spec.kind == "json":
            pattern = self.oc.json_schema.build_regex_from_schema(spec.value)
        elif spec.kind == "regex":
            pattern = spec.value
        else:
            pattern = "(" + "|".join(re.escape(c) for c in spec.value) + ")"
        return self.oc.Index(pattern, self.vocabulary)

    def new(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, guide, row: np.ndarray) -> None:
        guide.write_mask_into(row.ctypes.data, row.size, 4)

    def advance(self, guide, token: int) -> None:
        guide.advance(token, return_tokens=False)


# Keys are the libraries' distribution names.
LIBRARIES = {"llguidance": _Llguidance, "outlines_core": _OutlinesCore, "xgrammar": _Xgrammar}


def _allowed(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def _walk(lib, compiled, row: np.ndarray, rng: np.random.Generator, eos: set[int],
          max_tokens: int) -> tuple[list[float], list[int]]:
    """One walk from a fresh matcher: (mask times in µs, tokens taken before EOS)."""
    matcher = lib.new(compiled)
    times, tokens = [], []
    for _ in range(max_tokens):
        start = time.perf_counter_ns()
        lib.fill(matcher, row)
        times.append((time.perf_counter_ns() - start) / 1e3)
        allowed = _allowed(row)
        if allowed.size == 0:
            raise RuntimeError("the mask allows no token")
        token = int(rng.choice(allowed))
        if token in eos:
            break
        lib.advance(matcher, token)
        tokens.append(token)
    return times, tokens


def _measure(lib, spec: StructuredSpec, vocab_size: int, eos: set[int], tokenizer: Tokenizer,
             rng: np.random.Generator) -> dict:
    row = np.zeros(num_words(vocab_size), np.int32)
    start = time.perf_counter()
    compiled = lib.compile(spec)
    compile_ms = (time.perf_counter() - start) * 1e3
    first = lib.new(compiled)
    start = time.perf_counter_ns()
    lib.fill(first, row)
    first_mask_us = (time.perf_counter_ns() - start) / 1e3
    for _ in range(_WARMUP.value):
        _walk(lib, compiled, row, rng, eos, _MAX_TOKENS.value)
    times, lengths, sample = [], [], None
    for _ in range(_WALKS.value):
        walk_times, tokens = _walk(lib, compiled, row, rng, eos, _MAX_TOKENS.value)
        times += walk_times
        lengths.append(len(tokens))
        sample = sample or tokenizer.decode(tokens)
    times = np.asarray(times)
    return {
        "compile_ms": compile_ms,
        "first_mask_us": first_mask_us,
        "mean_us": float(times.mean()),
        "p50_us": float(np.percentile(times, 50)),
        "p99_us": float(np.percentile(times, 99)),
        "masks": int(times.size),
        "mean_tokens_per_walk": float(np.mean(lengths)),
        "sample": sample,
    }


def _batch_fill(tokenizer: Tokenizer, vocab_size: int, rows: int, rng: np.random.Generator,
                max_tokens: int) -> dict:
    """µs per row of filling `rows` lockstep matchers one by one and with `fill_bitmasks`."""
    compiler = GrammarCompiler(tokenizer, vocab_size)
    spec = CONSTRAINTS["json_object_schema"]
    out = np.zeros((rows, num_words(vocab_size)), np.int32)
    timings: dict[str, list[float]] = {"one_by_one": [], "fill_bitmasks": []}
    for _ in range(2):  # the first round warms the lexer up and is not kept
        for series in timings.values():
            series.clear()
        active = [(compiler.compile(spec), i) for i in range(rows)]
        for _ in range(max_tokens):
            if not active:
                break
            start = time.perf_counter_ns()
            for matcher, i in active:
                matcher.fill_bitmask(out[i])
            timings["one_by_one"].append((time.perf_counter_ns() - start) / 1e3 / len(active))
            start = time.perf_counter_ns()
            compiler.fill_bitmasks(active, out)
            timings["fill_bitmasks"].append((time.perf_counter_ns() - start) / 1e3 / len(active))
            still = []
            for matcher, i in active:
                token = int(rng.choice(_allowed(out[i])))
                if token not in compiler.eos_token_ids:
                    matcher.consume(token)
                    still.append((matcher, i))
            active = still
    return {"rows": rows, "steps": len(timings["one_by_one"]),
            **{f"{k}_us_per_row": float(np.mean(v)) for k, v in timings.items()}}


def main(argv: list[str]) -> None:
    del argv
    tokenizer, config = load_tokenizer(_MODEL.value)  # the logits are config.vocab_size wide
    vocab_size = config.vocab_size
    eos = set(tokenizer.eos_token_ids)
    report = {"model": _MODEL.value, "vocab_size": vocab_size, "cpus": os.cpu_count(),
              "walks": _WALKS.value, "warmup_walks": _WARMUP.value, "seed": _SEED.value,
              "versions": {}, "libraries": {}}
    for name, factory in LIBRARIES.items():
        try:
            report["versions"][name] = importlib.metadata.version(name)
            start = time.perf_counter()
            lib = factory(tokenizer, vocab_size)
            entry = {"tokenizer_s": time.perf_counter() - start, "constraints": {}}
        except Exception as e:  # noqa: BLE001 - a library that cannot run is reported, not fatal
            report["libraries"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        report["libraries"][name] = entry
        for cname, spec in CONSTRAINTS.items():
            rng = np.random.default_rng(_SEED.value)
            try:
                entry["constraints"][cname] = _measure(lib, spec, vocab_size, eos, tokenizer, rng)
            except Exception as e:  # noqa: BLE001 - as above, per constraint
                entry["constraints"][cname] = {"error": f"{type(e).__name__}: {e}"}
    if _BATCH_ROWS.value:
        report["llguidance_batch"] = _batch_fill(tokenizer, vocab_size, _BATCH_ROWS.value,
                                                 np.random.default_rng(_SEED.value),
                                                 _MAX_TOKENS.value)

    print(f"{'library':<14} {'constraint':<19} {'compile ms':>10} {'first µs':>9} "
          f"{'mean µs':>8} {'p99 µs':>8} {'tok/walk':>8}")
    for name, entry in report["libraries"].items():
        if "error" in entry:
            print(f"{name:<14} cannot run: {entry['error']}")
            continue
        for cname, r in entry["constraints"].items():
            if "error" in r:
                print(f"{name:<14} {cname:<19} error: {r['error']}")
                continue
            print(f"{name:<14} {cname:<19} {r['compile_ms']:10.1f} {r['first_mask_us']:9.0f} "
                  f"{r['mean_us']:8.1f} {r['p99_us']:8.1f} {r['mean_tokens_per_walk']:8.1f}")
    if "llguidance_batch" in report:
        b = report["llguidance_batch"]
        print(f"llguidance, {b['rows']} JSON matchers in lockstep ({b['steps']} steps): "
              f"{b['one_by_one_us_per_row']:.1f} µs/row one by one, "
              f"{b['fill_bitmasks_us_per_row']:.1f} µs/row with fill_bitmasks")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
