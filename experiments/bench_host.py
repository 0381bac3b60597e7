"""The host's work per step, measured where the device's work is almost nothing.

    python -m experiments.bench_host [--num_requests=256] [--repeats=3] [--out=out/bench/host]

On an accelerator a decode step of a small model takes a few milliseconds, so the host must
plan, lay out and launch the next step, and take in the last one's tokens, in less than
that. A CPU cannot show this with a real model (its steps take hundreds of milliseconds); a
tiny random model (`batchjax.models.tiny`, with a vocabulary of 512 ids) can: its steps cost
little, so a run's time is mostly the host's. The workload is shared documents (16 questions per document), EOS
ignored. Each repetition runs the job with the overlapped loop and with the synchronous one,
alternating, in one engine: host time per step, device-idle fraction, steps per second, and
the overlapped loop's wall-time ratio over the synchronous one. Writes `host.json`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

_NUM = flags.DEFINE_integer("num_requests", 256, "Requests (a multiple of 16).")
_DOC = flags.DEFINE_integer("doc_tokens", 400, "Tokens of each shared document.")
_QUESTION = flags.DEFINE_integer("question_tokens", 30, "Tokens of each question.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Output tokens of each request.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions of each arm, alternating.")
_OUT = flags.DEFINE_string("out", "out/bench/host", "Output directory (the model is kept there).")


def _requests(rng: np.random.Generator, vocab: int) -> list[dict]:
    requests = []
    for d in range(_NUM.value // 16):
        doc = rng.integers(3, vocab, _DOC.value).tolist()
        for q in range(16):
            question = rng.integers(3, vocab, _QUESTION.value).tolist()
            requests.append({"id": f"d{d}q{q}", "prompt_token_ids": doc + question,
                             "max_tokens": _MAX_TOKENS.value, "ignore_eos": True})
    return requests


def main(argv) -> None:
    del argv
    from batchjax.engine.engine import Engine
    from batchjax.models.tiny import make_tiny_model

    os.makedirs(_OUT.value, exist_ok=True)
    context = _DOC.value + _QUESTION.value + _MAX_TOKENS.value
    vocab = 512
    model = make_tiny_model(os.path.join(_OUT.value, f"tiny_model_{context}_{vocab}"),
                            max_position_embeddings=max(512, context), vocab_size=vocab)
    engines = {overlap: Engine(model, progress=False, kv_budget_mb=64, overlap=overlap)
               for overlap in (True, False)}
    requests = _requests(np.random.default_rng(0), vocab)
    for engine in engines.values():  # compile every shape, and load the native kernels
        engine.generate(requests)
    runs: dict[str, list[dict]] = {"overlapped": [], "synchronous": []}
    outputs = {}
    for _ in range(_REPEATS.value):
        for overlap, engine in engines.items():
            arm = "overlapped" if overlap else "synchronous"
            results = engine.generate(requests)
            outputs[arm] = [r.token_ids for r in results]
            m = engine.last_metrics
            steps = m["prefill_steps"] + m["decode_steps"] + m["compiling_steps"]
            runs[arm].append({
                "wall_s": m["wall_s"], "busy_s": m["busy_s"], "steps": steps,
                "host_ms_per_step": m["host_s_per_step"] * 1e3,
                "device_idle_fraction": m["device_idle_fraction"],
                "compiled_after_warmup": m["compiled_after_warmup"]})
    if outputs["overlapped"] != outputs["synchronous"]:
        raise SystemExit("the overlapped loop's tokens differ from the synchronous loop's")
    median = {arm: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
              for arm, rs in runs.items()}
    report = {"num_requests": len(requests), "doc_tokens": _DOC.value,
              "question_tokens": _QUESTION.value, "max_tokens": _MAX_TOKENS.value,
              "repeats": _REPEATS.value, "runs": runs, "median": median,
              "overlap_speedup": median["synchronous"]["busy_s"] / median["overlapped"]["busy_s"]}
    with open(os.path.join(_OUT.value, "host.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(requests)} requests, {median['overlapped']['steps']:.0f} steps; "
          f"median of {_REPEATS.value} (same tokens in both loops)")
    print("| loop | host ms per step | device idle | loop s | steps/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arm, m in median.items():
        print(f"| {arm} | {m['host_ms_per_step']:.2f} | {m['device_idle_fraction']:.0%} | "
              f"{m['busy_s']:.2f} | {m['steps'] / m['busy_s']:.1f} |")
    print(f"overlapped over synchronous: {report['overlap_speedup']:.2f}x")


if __name__ == "__main__":
    app.run(main)
