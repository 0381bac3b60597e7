"""Driving the peer systems (vLLM, transformers) in their own interpreters.

Each peer is a runner script executed by that system's Python: the harness writes the workloads
as token-id JSONL, the runner writes a JSON report (`experiments/peers/peer_io.py` defines it).
A peer whose interpreter or package is absent is reported as missing with the reason; a peer
that crashes is reported as failed with the end of its log. Neither is ever dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any, Mapping

_LOG_TAIL_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """One peer configuration, as a row label in the tables and a command line."""

    system: str  # table label, e.g. "vllm (prefix caching + chunked prefill)"
    package: str  # what its interpreter must be able to import
    python: str
    runner: str  # path of the runner script
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PeerOutcome:
    """What came of one peer at one dtype: its report, or why there is none."""

    system: str
    dtype: str
    status: str  # "ok" | "missing" | "failed"
    reason: str | None
    report: dict[str, Any] | None
    log_path: str | None


def missing_reason(python: str, package: str) -> str | None:
    """Why `python` cannot run `package`, or None when it can."""
    if not python:
        return "no interpreter given"
    if not os.path.isfile(python) or not os.access(python, os.X_OK):
        return f"interpreter {python} not found"
    probe = (f"import importlib.util, sys; "
             f"sys.exit(0 if importlib.util.find_spec({package!r}) else 1)")
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"{python} did not answer within 120 s"
    if proc.returncode != 0:
        return f"{package} is not installed for {python}"
    return None


def _log_tail(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-_LOG_TAIL_CHARS:]


def run_peer(
    peer: PeerSpec,
    workload_paths: Mapping[str, str],
    *,
    model_dir: str,
    dtype: str,
    reps: int,
    kv_budget_mb: float,
    max_tokens_per_step: int,
    num_threads: int,
    out_dir: str,
    timeout_s: float | None = None,
) -> PeerOutcome:
    """Runs every workload `reps` times through one peer; its log goes beside the report."""
    reason = missing_reason(peer.python, peer.package)
    if reason is not None:
        return PeerOutcome(peer.system, dtype, "missing", reason, None, None)
    stem = "".join(c if c.isalnum() else "_" for c in f"{peer.system}_{dtype}").strip("_")
    report_path = os.path.join(out_dir, f"{stem}.json")
    log_path = os.path.join(out_dir, f"{stem}.log")
    cmd = [peer.python, peer.runner, "--model_dir", model_dir, "--dtype", dtype,
           "--reps", str(reps), "--kv_budget_mb", str(kv_budget_mb),
           "--max_tokens_per_step", str(max_tokens_per_step), "--num_threads", str(num_threads),
           "--out", report_path, *peer.args]
    for name, path in workload_paths.items():
        cmd += ["--workload", f"{name}={path}"]
    env = {**os.environ, **peer.env}
    with open(log_path, "w", encoding="utf-8") as log:
        # Its own process group: vLLM forks an engine and a worker that must end with it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return PeerOutcome(peer.system, dtype, "failed", f"timed out after {timeout_s} s",
                               None, log_path)
    if proc.returncode != 0 or not os.path.isfile(report_path):
        tail = _log_tail(log_path)
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        reason = f"exit status {proc.returncode}: {last}\n{tail}"
        return PeerOutcome(peer.system, dtype, "failed", reason, None, log_path)
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    return PeerOutcome(peer.system, dtype, "ok", None, report, log_path)


def ensure_hf_checkpoint(python: str, export_script: str, gguf_path: str, out_dir: str) -> str:
    """The GGUF model dequantized into an f32 HF directory, exported once and then reused."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    cmd = [python or sys.executable, export_script, "--gguf_dir", os.path.dirname(gguf_path),
           "--gguf_file", os.path.basename(gguf_path), "--out", out_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exporting {gguf_path} to {out_dir} failed:\n{proc.stderr[-2000:]}")
    return out_dir
