"""lm-eval through batchjax against lm-eval's own HF backend, on one multiple-choice task.

    python -m experiments.bench_lm_eval [--items=256] [--context_tokens=300] [--limit=0]
        [--hf_batch_size=16] [--systems=batchjax,hf] [--out=out/bench/lm_eval]

The task is generated (seeded): `--items` items, each a passage of about `--context_tokens`
tokens of its own (sentences of random common words), a question, and four answers of two to
six words, one right; lm-eval scores every (context, answer) pair, so the HF backend runs each
context four times, while batchjax's scoring puts the four pairs of an item in one prefix
group and computes its context once. Both run SmolLM2-135M in f32 on the same weights (the
GGUF file for batchjax, its f32 HF export for the HF backend), one after the other in this
process, with the same lm-eval call (`simple_evaluate`, zero-shot). Reported per system:
model load (batchjax: engine start, compilation included), evaluation seconds, items/s over
the evaluation, accuracy; and per item, the largest loglikelihood difference between the two.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_ITEMS = flags.DEFINE_integer("items", 256, "Items in the task (four choices each).")
_CONTEXT = flags.DEFINE_integer("context_tokens", 300, "About this many tokens per context.")
_HF_BATCH = flags.DEFINE_integer("hf_batch_size", 16, "lm-eval's --batch_size for the HF backend.")
_SYSTEMS = flags.DEFINE_list("systems", ["batchjax", "hf"], "Which backends to run, in order.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated task.")
_OUT = flags.DEFINE_string("out", "out/bench/lm_eval", "Directory for the task and the report.")

_WORDS = ("time year people way day man thing woman life child world school state family "
          "student group country problem hand part place case week company system program "
          "question work government number night point home water room mother area money "
          "story fact month lot right study book eye job word business issue side kind head "
          "house service friend father power hour game line end member law car city name "
          "team minute idea kid body information back parent face others level office door "
          "health person art war history party result change morning reason research girl "
          "guy moment air teacher force education river garden stone bridge market").split()
_TASK = "bench_lm_eval_mc"


def _sentence(rng) -> str:
    words = [str(w) for w in rng.choice(_WORDS, int(rng.integers(6, 14)))]
    return " ".join(words).capitalize() + "."


def make_task(directory: str, items: int, context_tokens: int, seed: int, tokenizer) -> str:
    """Writes the task's data and YAML under `directory`; returns the directory."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, "test.jsonl")
    with open(data, "w") as f:
        for i in range(items):
            passage = ""
            while len(tokenizer.encode(passage, add_special_tokens=False)) < context_tokens:
                passage += (" " if passage else "") + _sentence(rng)
            choices = [" ".join(str(w) for w in rng.choice(_WORDS, int(rng.integers(2, 7))))
                       for _ in range(4)]
            f.write(json.dumps({"id": i, "passage": passage, "choices": choices,
                                "label": int(rng.integers(4))}) + "\n")
    with open(os.path.join(directory, f"{_TASK}.yaml"), "w") as f:
        f.write(f"""task: {_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(os.path.abspath(data))}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{passage}}}}\\nQuestion: Which words come next?\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return directory


def _evaluate(lm, task_dir: str) -> tuple[dict, float]:
    import lm_eval
    import lm_eval.tasks

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[_TASK], task_manager=lm_eval.tasks.TaskManager(include_path=task_dir),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return results, time.perf_counter() - start


def _build(system: str):
    """(the lm-eval model object, seconds to build it)."""
    start = time.perf_counter()
    if system == "batchjax":
        from batchjax.engine.engine import Engine
        from batchjax.evals import BatchjaxLM

        lm = BatchjaxLM(engine=Engine("smollm2-135m", dtype="float32"))
    elif system == "hf":
        import torch
        from lm_eval.models.huggingface import HFLM

        from batchjax.bench.peers import ensure_hf_checkpoint
        from batchjax.models.registry import resolve_spec

        torch.set_num_threads(os.cpu_count() or 1)
        here = os.path.dirname(os.path.abspath(__file__))
        hf_dir = ensure_hf_checkpoint(sys.executable, os.path.join(here, "peers", "export_hf.py"),
                                      resolve_spec("smollm2-135m")[1],
                                      os.path.join("out", "peers", "smollm2_hf"))
        lm = HFLM(pretrained=hf_dir, dtype="float32", device="cpu",
                  batch_size=_HF_BATCH.value)
    else:
        raise app.UsageError(f"unknown system {system!r}; expected batchjax or hf")
    return lm, time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    from batchjax.models.registry import load_tokenizer

    tokenizer, _ = load_tokenizer("smollm2-135m")
    task_dir = make_task(os.path.join(_OUT.value, "task"), _ITEMS.value, _CONTEXT.value,
                         _SEED.value, tokenizer)
    report = {"items": _ITEMS.value, "choices": 4, "context_tokens": _CONTEXT.value,
              "cpus": os.cpu_count(), "hf_batch_size": _HF_BATCH.value, "systems": {}}
    lls = {}
    for system in _SYSTEMS.value:
        lm, build_s = _build(system)
        results, eval_s = _evaluate(lm, task_dir)
        # batchjax compiles a job's step shapes before its first step (cached on disk for
        # the next run): part of eval_s, reported too.
        warmup_s = lm.engine.last_metrics.get("warmup_s") if system == "batchjax" else None
        del lm
        samples = sorted(results["samples"][_TASK], key=lambda s: s["doc_id"])
        lls[system] = np.array([[float(r[0][0]) for r in s["resps"]] for s in samples])
        report["systems"][system] = {
            "build_s": build_s, "eval_s": eval_s, "warmup_s": warmup_s, "items_per_s": len(samples) / eval_s,
            "acc": results["results"][_TASK]["acc,none"]}
        print(f"{system}: build {build_s:.1f} s, evaluate {eval_s:.1f} s "
              f"(compiling {warmup_s or 0:.1f} s), "
              f"{len(samples) / eval_s:.2f} items/s, acc {report['systems'][system]['acc']:.4f}",
              flush=True)
    if {"batchjax", "hf"} <= set(lls):
        s = report["systems"]
        report["speedup_items_per_s"] = s["batchjax"]["items_per_s"] / s["hf"]["items_per_s"]
        report["speedup_with_build"] = ((s["hf"]["eval_s"] + s["hf"]["build_s"])
                                        / (s["batchjax"]["eval_s"] + s["batchjax"]["build_s"]))
        report["max_abs_ll_diff"] = float(np.max(np.abs(lls["batchjax"] - lls["hf"])))
        report["same_predictions"] = bool(
            (lls["batchjax"].argmax(1) == lls["hf"].argmax(1)).all())
        print(f"batchjax / hf: {report['speedup_items_per_s']:.2f}x items/s over the "
              f"evaluation, {report['speedup_with_build']:.2f}x with model load; largest "
              f"loglikelihood difference {report['max_abs_ll_diff']:.2e}; same predictions: "
              f"{report['same_predictions']}")
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(_OUT.value, 'results.json')}")


if __name__ == "__main__":
    app.run(main)
