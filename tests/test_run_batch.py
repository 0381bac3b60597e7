"""The main job end to end: `python -m experiments.run_batch` on a tiny token-level model.

Each run is a real subprocess, as a user starts it: results stream to the output file, a
SIGKILL mid-run loses nothing that was written, a rerun resumes to the file an uninterrupted
run writes, bad lines only cost themselves, and both input shapes come back in their own shape.
Runs share one engine configuration so the persistent XLA cache spares recompiling, and the
reference runs happen once per session even when `pytest -n 2` splits this module.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import once_per_session

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, CONTEXT = 128, 256  # the tiny_llama_dir model
NUM_DOCS, QUESTIONS, MAX_TOKENS = 4, 10, 40
# Long enough (about 130 steps of at most 16 tokens) that a kill lands between the first result
# and the last one; short enough to cost a few seconds once compiled.
RUN_FLAGS = ("--max_tokens_per_step=16", "--kv_budget_mb=1", "--config.print_results=0")
METRIC_KEYS = (
    "policy", "num_requests", "num_groups", "logical_prefill_tokens", "computed_prefill_tokens",
    "saving_ratio", "optimal_saving_ratio", "output_tokens", "num_steps", "peak_kv_pages",
    "kv_budget_pages", "plan_s", "wall_s", "output_tokens_per_s", "total_tokens_per_s",
    "num_compiled_shapes", "failed_requests",
)
# (input line, field its error names, a word its message holds); inserted after BAD_AFTER lines.
BAD_AFTER = 3
BAD_LINES = (
    ('{"id": "broken", "prompt_token_ids": [3, 4', None, "JSON"),
    (json.dumps({"id": "no-prompt", "max_tokens": 4}), "prompt", "prompt"),
    (json.dumps({"id": "negative-max", "prompt_token_ids": [3, 4], "max_tokens": -1}),
     "max_tokens", "in [1, "),
    (json.dumps({"id": "too-long", "prompt_token_ids": [3] * (CONTEXT + 44), "max_tokens": 4}),
     "prompt_token_ids", "context"),
    (json.dumps({"id": "bad-token", "prompt_token_ids": [3, VOCAB], "max_tokens": 4}),
     "prompt_token_ids", "vocabulary"),
)
NUM_GOOD = NUM_DOCS * QUESTIONS


def _input_lines() -> tuple[list[str], list[str]]:
    """The JSONL lines (good ones with bad ones among them) and the ids in input order."""
    rng = np.random.default_rng(0)
    lines, ids = [], []
    for d in range(NUM_DOCS):
        doc = rng.integers(3, VOCAB, size=12).tolist()
        for q in range(QUESTIONS):
            request_id = f"doc{d}-q{q}"
            prompt = doc + rng.integers(3, VOCAB, size=4).tolist()
            lines.append(json.dumps({"id": request_id, "prompt_token_ids": prompt,
                                     "max_tokens": MAX_TOKENS, "ignore_eos": True}))
            ids.append(request_id)
    for k, (line, _, _) in enumerate(BAD_LINES):
        lines.insert(BAD_AFTER + k, line)
        request_id = json.loads(line)["id"] if line.endswith("}") else f"line-{BAD_AFTER + k + 1}"
        ids.insert(BAD_AFTER + k, request_id)
    return lines, ids


# Two data-parallel replicas on two forced host devices (fixed when JAX starts, so set in the
# child's environment).
REPLICAS = ("--data_parallel=2",)


def _env(extra_flags) -> dict | None:
    if not extra_flags:
        return None
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    return env


def _start(model_dir, input_path, output_path, metrics_path, extra_flags=()) -> subprocess.Popen:
    log = open(f"{output_path}.log", "ab")  # a file, not a pipe: a full pipe would stall the run
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "experiments.run_batch", f"--input={input_path}",
             f"--output={output_path}", f"--metrics_out={metrics_path}", f"--model={model_dir}",
             *RUN_FLAGS, *extra_flags],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(extra_flags))
    finally:
        log.close()


def _finish(proc: subprocess.Popen, output_path, timeout=240) -> None:
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        with open(f"{output_path}.log", errors="replace") as f:
            pytest.fail(f"run_batch exited with {rc}:\n{f.read()[-4000:]}")


def _complete_lines(path) -> list[dict]:
    """The JSON lines of a file that end in a newline (a killed writer may leave a torn tail)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    return [json.loads(raw) for raw in data[: data.rfind(b"\n") + 1].splitlines()]


def _load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _essence(line: dict) -> tuple:
    if "error" in line:
        return line["id"], "error", line["error"]
    return line["id"], tuple(line["token_ids"]), line["finish_reason"]


def _reference_runs(model_dir: str, tmp) -> dict:
    """An uninterrupted native run and an OpenAI-shaped run, started side by side."""
    lines, ids = _input_lines()
    native_in = tmp / "native.jsonl"
    native_in.write_text("\n".join(lines) + "\n")

    rng = np.random.default_rng(1)
    openai_prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (5, 9, 7)]
    openai_lines = [
        {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": prompt, "max_tokens": 8, "ignore_eos": True}}
        for i, prompt in enumerate(openai_prompts)
    ]
    openai_lines.insert(1, {"custom_id": "task-bad", "method": "POST", "url": "/v1/completions",
                            "body": {"prompt": [3, 4], "max_tokens": 0}})
    openai_in = tmp / "openai.jsonl"
    openai_in.write_text("".join(json.dumps(line) + "\n" for line in openai_lines))

    native = _start(model_dir, native_in, tmp / "full.jsonl", tmp / "full.json")
    openai = _start(model_dir, openai_in, tmp / "openai_out.jsonl", tmp / "openai.json")
    _finish(native, tmp / "full.jsonl")
    _finish(openai, tmp / "openai_out.jsonl")
    return dict(tmp=str(tmp), model_dir=model_dir, native_in=str(native_in), ids=ids,
                openai_lines=openai_lines, openai_prompts=openai_prompts)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    # The model is built only by the worker that runs the reference.
    value = once_per_session(
        tmp_path_factory, "run_batch_reference",
        lambda tmp: _reference_runs(str(request.getfixturevalue("tiny_llama_dir")), tmp))
    value["tmp"] = pathlib.Path(value["tmp"])
    return value


def test_uninterrupted_run_writes_every_id_once_in_input_order(runs):
    out = _complete_lines(runs["tmp"] / "full.jsonl")
    assert [line["id"] for line in out] == runs["ids"]
    good = [line for line in out if "error" not in line]
    assert len(good) == NUM_GOOD
    for line in good:
        assert len(line["token_ids"]) == MAX_TOKENS and line["finish_reason"] == "length"
        assert all(0 <= t < VOCAB for t in line["token_ids"])
        assert line["text"] is None  # a model directory without a tokenizer
        assert line["usage"]["prompt_tokens"] == 16
        assert line["usage"]["completion_tokens"] == MAX_TOKENS


def test_bad_lines_get_errors_naming_the_field_and_the_rest_complete(runs):
    out = {line["id"]: line for line in _complete_lines(runs["tmp"] / "full.jsonl")}
    for k, (_, field, word) in enumerate(BAD_LINES):
        line = out[runs["ids"][BAD_AFTER + k]]
        assert set(line) == {"id", "error"}, line
        assert line["error"].get("field") == field, line
        assert word in line["error"]["message"], line
    assert sum("error" in line for line in out.values()) == len(BAD_LINES)
    assert _load_json(runs["tmp"] / "full.json")["failed_requests"] == len(BAD_LINES)


def test_metrics_hold_the_documented_fields_within_the_kv_budget(runs):
    m = _load_json(runs["tmp"] / "full.json")
    assert not [k for k in METRIC_KEYS if k not in m]
    assert m["policy"] == "batchllm" and m["resumed_requests"] == 0
    assert m["num_requests"] == NUM_GOOD and m["num_groups"] == NUM_DOCS
    assert m["peak_kv_pages"] <= m["kv_budget_pages"]
    assert m["output_tokens"] == NUM_GOOD * MAX_TOKENS
    assert m["logical_prefill_tokens"] == NUM_GOOD * 16
    # Each document's 12 tokens run once instead of ten times.
    assert m["computed_prefill_tokens"] == m["logical_prefill_tokens"] - NUM_DOCS * 9 * 12
    assert m["saving_ratio"] == pytest.approx(1 - m["computed_prefill_tokens"] / (NUM_GOOD * 16))
    assert m["saving_ratio"] <= m["optimal_saving_ratio"]
    assert m["num_steps"] >= MAX_TOKENS
    # Every shape compiled before the first step, within the step loop's table.
    assert 1 <= m["num_compiled_shapes"] <= 16 and m["compiled_after_warmup"] == 0
    assert m["warmup_s"] > 0 and m["compiling_steps"] == 0
    for key in ("plan_s", "wall_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert m[key] > 0, key


@pytest.mark.parametrize("extra_flags", [(), REPLICAS], ids=["one-replica", "two-replicas"])
def test_killed_run_resumes_to_the_uninterrupted_file(runs, tmp_path, extra_flags):
    """Also with two replicas: whichever replica finished an id, the rerun skips it, and the
    requests in flight on either replica at the kill run again."""
    model_dir = runs["model_dir"]  # the reference runs' model (another worker may have made it)
    out, metrics = tmp_path / "killed.jsonl", tmp_path / "killed.json"
    proc = _start(model_dir, runs["native_in"], out, metrics, extra_flags)
    try:
        deadline = time.monotonic() + 240
        # Error lines are written before the first step: wait for a generated result.
        while not any("token_ids" in line for line in _complete_lines(out)):
            if proc.poll() is not None:
                _finish(proc, out)
                pytest.fail("run_batch finished before it could be killed")
            assert time.monotonic() < deadline, "no result line within the deadline"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _complete_lines(out)
    done = [line for line in at_kill if "token_ids" in line]
    assert 1 <= len(done) < NUM_GOOD, "the kill must land mid-run"
    assert not os.path.exists(metrics)

    _finish(_start(model_dir, runs["native_in"], out, metrics, extra_flags), out)
    final = _complete_lines(out)
    assert [line["id"] for line in final] == runs["ids"]  # every id once, in input order
    full = _complete_lines(runs["tmp"] / "full.jsonl")
    assert [_essence(line) for line in final] == [_essence(line) for line in full]
    m = _load_json(metrics)
    assert m["resumed_requests"] == len(at_kill) > 0
    assert m["num_requests"] == NUM_GOOD - len(done)  # finished requests did not run again
    assert m["failed_requests"] == len(BAD_LINES)  # counted from the file, resumed or not
    assert m["peak_kv_pages"] <= m["kv_budget_pages"]
    if extra_flags:
        assert m["data_parallel"] == 2 and len(m["replicas"]) == 2
        assert all(r["peak_kv_pages"] <= r["kv_budget_pages"] for r in m["replicas"])


def test_openai_batch_input_gets_openai_shaped_output(runs):
    out = _complete_lines(runs["tmp"] / "openai_out.jsonl")
    assert [line["custom_id"] for line in out] == [r["custom_id"] for r in runs["openai_lines"]]
    assert len({line["id"] for line in out}) == len(out)
    prompts = iter(runs["openai_prompts"])
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        if line["custom_id"] == "task-bad":
            assert response["status_code"] == 400
            assert response["body"]["error"]["param"] == "body.max_tokens"
            assert response["body"]["error"]["type"] == "invalid_request_error"
            continue
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "length"
        assert "text" in choice
        assert len(choice["token_ids"]) == 8  # a model without a tokenizer still answers
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(next(prompts))
        assert usage["completion_tokens"] == 8
        assert usage["total_tokens"] == usage["prompt_tokens"] + 8
        assert "cached_tokens" in usage["prompt_tokens_details"]
    m = _load_json(runs["tmp"] / "openai.json")
    assert m["failed_requests"] == 1 and m["num_requests"] == 3
