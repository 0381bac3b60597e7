"""The main job: a JSONL of requests in, a JSONL of completions out, plus metrics.

    python -m experiments.run_batch --input=IN.jsonl --output=OUT.jsonl --metrics_out=M.json \
        [--model=smollm2-135m|HF_DIR|FILE.gguf|ORBAX_DIR] [--policy=batchllm|vllm|sglang|none] \
        [--attention=xla|pallas] [--cpu_kernels=auto|native|xla] [--kv_budget_mb=N] \
        [--max_tokens_per_step=N] [--tensor_parallel=T] [--data_parallel=D] \
        [--distributed=local|ray] [--ray_address=ADDR] \
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I] \
        [--config=configs/run_batch.py --config.key=value]

Results are appended as requests finish; rerunning with the same --output resumes.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from batchjax.cluster import Engine, multihost
from batchjax.metrics import replica_table, summary_table
from batchjax.engine.results import OutputInUseError, ResultsJournal
from batchjax.requests import read_requests_jsonl

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "run_batch.py"),
    "Python config file with the run's defaults.")
_INPUT = flags.DEFINE_string("input", None, "JSONL of requests.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL of results (resumed if it exists).",
                              required=True)
_METRICS = flags.DEFINE_string("metrics_out", None, "Where to write the metrics JSON.")
# A multi-host job (tensor parallel across hosts): the same command on every host.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 of a multi-host job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's rank in the job.")
# Shortcuts for the most used config keys; a flag given here wins over --config.*.
_OVERRIDES = {
    "model": flags.DEFINE_string("model", None, "smollm2-135m, an HF dir, a .gguf or orbax dir."),
    "policy": flags.DEFINE_enum("policy", None, ["batchllm", "vllm", "sglang", "none"],
                                "Scheduling policy."),
    "attention": flags.DEFINE_enum("attention", None, ["xla", "pallas"], "Attention path."),
    "cpu_kernels": flags.DEFINE_enum("cpu_kernels", None, ["auto", "native", "xla"],
                                     "Native CPU kernels (dense products, paged rows) or XLA."),
    "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype."),
    "kv_budget_mb": flags.DEFINE_float("kv_budget_mb", None, "KV cache memory budget (MiB)."),
    "max_tokens_per_step": flags.DEFINE_integer("max_tokens_per_step", None,
                                                "Token budget of one step."),
    "strict": flags.DEFINE_bool("strict", None, "Reject unknown fields in input lines."),
    "tensor_parallel": flags.DEFINE_integer(
        "tensor_parallel", None, "Devices per replica: heads and MLP columns split over them."),
    "data_parallel": flags.DEFINE_integer(
        "data_parallel", None, "Replicas, each with its own KV pool; whole prefix groups each."),
    "distributed": flags.DEFINE_enum("distributed", None, ["local", "ray"],
                                     "Replicas in this process (local) or as Ray actors."),
    "ray_address": flags.DEFINE_string("ray_address", None,
                                       "A running Ray cluster to join (default: start one)."),
}


def main(argv):
    del argv
    cfg = _CONFIG.value
    for key, flag in _OVERRIDES.items():
        if flag.value is not None:
            cfg[key] = flag.value

    if _COORDINATOR.value:  # before anything touches a JAX device
        multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Process 0 alone writes the output; every process runs every step of the same job.
    leader = multihost.is_leader()

    try:
        requests, errors, fmt = read_requests_jsonl(_INPUT.value, strict=cfg.strict)
    except OSError as e:
        sys.exit(f"run_batch: cannot read the input: {e}")
    journal, finished, resumed = None, [], 0
    if leader:
        out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
        try:
            os.makedirs(out_dir, exist_ok=True)
            journal = ResultsJournal(_OUTPUT.value, fmt, model=cfg.model)
        except OutputInUseError as e:
            sys.exit(f"run_batch: {_OUTPUT.value}: {e}")
        except OSError as e:
            sys.exit(f"run_batch: cannot write the output {_OUTPUT.value}: {e}")
        resumed = len(journal.finished_ids)
        for err in errors:
            if journal.error_key(err) not in journal.finished_ids:
                journal.append_error(err)
        finished = sorted(journal.finished_ids)
    if multihost.num_processes() > 1:  # the same job everywhere, resumed from process 0's file
        finished = multihost.broadcast_from_leader(finished)
        multihost.check_same_inputs(requests)
    if resumed:
        print(f"resuming {_OUTPUT.value}: {resumed} lines already written")

    try:
        engine = _engine(cfg)
    except (ValueError, OSError) as e:  # a model that cannot load, a budget that cannot fit
        if journal is not None:
            journal.close()
        sys.exit(f"run_batch: cannot start the engine: {type(e).__name__}: {e}")
    if leader and engine.tokenizer is not None:  # the text of each token in OpenAI logprobs
        journal.token_text = lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)
    try:
        results = engine.generate(requests, skip_ids=frozenset(finished),
                                  on_result=journal.append if leader else None)
    except OSError as e:  # the output's disk filled up or went away: what is written stays
        kept = len(journal.finished_ids) if journal is not None else 0
        if journal is not None:
            journal.close()
        sys.exit(f"run_batch: writing {_OUTPUT.value} failed: {e}; the {kept} lines written "
                 "are kept, and the same command resumes after them")
    if not leader:
        multihost.barrier("run_batch_done")
        return
    _finish(journal, requests, errors, resumed, engine, results, cfg)


def _engine(cfg) -> Engine:
    return Engine(
        cfg.model, policy=cfg.policy, dtype=cfg.dtype, attention=cfg.attention,
        cpu_kernels=cfg.cpu_kernels,
        page_size=cfg.page_size, kv_budget_mb=cfg.kv_budget_mb,
        max_tokens_per_step=cfg.max_tokens_per_step, max_num_seqs=cfg.max_num_seqs,
        prefix_levels=cfg.prefix_levels, min_saved_tokens=cfg.min_saved_tokens,
        overlap=cfg.overlap, tensor_parallel=cfg.tensor_parallel, placement=cfg.placement,
        data_parallel=cfg.data_parallel, distributed=cfg.distributed,
        ray_address=cfg.ray_address or None,
    )


def _finish(journal, requests, errors, resumed, engine, results, cfg) -> None:
    input_order = sorted([(r.index, r.id) for r in requests]
                         + [(e.line - 1, journal.error_key(e)) for e in errors])
    try:
        journal.finalize([request_id for _, request_id in input_order])
    except OSError as e:
        journal.close()
        sys.exit(f"run_batch: writing the final {_OUTPUT.value} failed: {e}; its "
                 f"{len(journal.finished_ids)} lines are kept as they were, and the same "
                 "command finishes it")
    journal.close()

    metrics = dict(engine.last_metrics)
    metrics["failed_requests"] = journal.num_errors  # this run's and any resumed run's
    metrics["resumed_requests"] = resumed
    metrics["model"] = cfg.model
    print(summary_table(metrics))
    if metrics.get("data_parallel", 1) > 1:
        print(replica_table(metrics))
    if resumed and not results:
        print(f"every request already has a line in {_OUTPUT.value}: nothing was run "
              "(remove that file or choose another --output to run the batch again)")
    for r in results[: cfg.print_results]:
        if r.error is None and r.text is not None:
            print(f"\n[{r.id}] {r.text.strip()}")
    if _METRICS.value:
        os.makedirs(os.path.dirname(os.path.abspath(_METRICS.value)), exist_ok=True)
        with open(_METRICS.value, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
            f.write("\n")
    if multihost.num_processes() > 1:
        multihost.barrier("run_batch_done")


if __name__ == "__main__":
    app.run(main)
