"""One job over two processes (`jax.distributed`, one CPU device each): tensor parallel across
them gives the one-process greedy tokens on both, and the processes check they run one job.

Each process is `tests/multihost_worker.py`, started here as a host would start it; the
collectives between them run over Gloo on localhost.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"page_size": 4, "kv_budget_mb": 1.0, "max_tokens_per_step": 32}
SHARED = [5, 9, 17, 33, 40, 41, 7, 8, 12]
PROMPTS = [SHARED + [3, 4], SHARED + [60, 61, 62], [70, 71, 72, 73, 74], SHARED + [90],
           [70, 71, 72, 99]]
REQUESTS = [{"id": f"r{i}", "prompt_token_ids": p, "max_tokens": 8 + i, "ignore_eos": True}
            for i, p in enumerate(PROMPTS)]
# What JAX says when a CPU program spans processes without cross-process collectives.
UNSUPPORTED = "Multiprocess computations aren't implemented on the CPU backend"
TIMEOUT_S = 120  # per job of workers; a hang (a process that never joins) fails, not blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    """One CPU device per process: no forced host device count."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES",)}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags or ["--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _start(tmp_path, name: str, specs: list[dict]) -> list[tuple]:
    """Starts one worker per spec; returns (process, spec, log path) of each."""
    coordinator = f"localhost:{_free_port()}"
    procs = []
    for pid, spec in enumerate(specs):
        spec = dict(spec, coordinator=coordinator, num_processes=len(specs), process_id=pid,
                    out=str(tmp_path / f"{name}_{pid}.json"))
        spec_path = tmp_path / f"{name}_{pid}_spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = tmp_path / f"{name}_{pid}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.multihost_worker", str(spec_path)], cwd=REPO,
                env=_worker_env(), stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, spec, log_path))
    return procs


def _finish(procs, deadline: float) -> list[dict]:
    """Every worker's output; skips where this JAX cannot run collectives across processes."""
    timed_out = False
    for proc, _, _ in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for proc, _, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = [log.read_text() for _, _, log in procs]
    failed = [p.returncode for p, _, _ in procs]
    if timed_out or any(failed):
        if any(UNSUPPORTED in log for log in logs):
            pytest.skip(f"this JAX cannot run CPU collectives across processes: {UNSUPPORTED}")
        tails = "\n".join(f"--- process {i} (rc {rc}) ---\n{log[-3000:]}"
                          for i, (rc, log) in enumerate(zip(failed, logs)))
        pytest.fail(("timed out" if timed_out else "a worker failed") + "\n" + tails)
    return [json.loads(open(spec["out"]).read()) for _, spec, _ in procs]


def _tensor_bytes(model_dir) -> int:
    """The weights' bytes in a HF directory's safetensors files."""
    from safetensors import safe_open

    from batchjax.models.safetensors_loader import safetensors_files

    total = 0
    for path in safetensors_files(str(model_dir)):
        with safe_open(path, framework="np") as f:
            total += sum(f.get_tensor(name).nbytes for name in f.keys())
    return total


@pytest.mark.parametrize("cpu_kernels", ["xla", "native"])
def test_tensor_parallel_over_two_processes_gives_the_one_process_tokens(
        tiny_llama_dir, tmp_path, cpu_kernels):
    if cpu_kernels == "native":
        from batchjax.kernels import native

        reason = native.unavailable_reason()
        if reason is not None:
            pytest.skip(f"native CPU kernels: {reason}")
    options = dict(SMALL, cpu_kernels=cpu_kernels, progress=False, compilation_cache_dir="")
    spec = {"mode": "generate", "model_dir": str(tiny_llama_dir), "requests": REQUESTS,
            "engine": options, "tensor_parallel": 2}
    procs = _start(tmp_path, f"tp_{cpu_kernels}", [spec, spec])
    deadline = time.monotonic() + TIMEOUT_S
    try:
        from batchjax.engine.engine import Engine

        # The one-process run, while the workers compile.
        one = Engine(str(tiny_llama_dir), **dict(SMALL, cpu_kernels=cpu_kernels,
                                                 progress=False))
        expected = [list(r.token_ids) for r in one.generate(REQUESTS)]
    finally:
        outs = _finish(procs, deadline)
    assert [len(t) for t in expected] == [r["max_tokens"] for r in REQUESTS]
    checkpoint_bytes = _tensor_bytes(tiny_llama_dir)
    assert sum(out["weight_bytes_read"] for out in outs) >= checkpoint_bytes  # all of it read
    for pid, out in enumerate(outs):
        assert (out["process_id"], out["num_processes"]) == (pid, 2)
        assert (out["num_devices"], out["local_devices"]) == (2, 1)
        assert out["leader"] == (pid == 0)
        assert out["errors"] == [None] * len(REQUESTS)
        assert out["token_ids"] == expected, f"process {pid}"
        m = out["metrics"]
        assert (m["tensor_parallel"], m["num_devices"]) == (2, 2)
        # Each process read its half of the checkpoint, not the whole of it.
        assert 0 < out["weight_bytes_read"] <= 0.55 * checkpoint_bytes, out["weight_bytes_read"]
        assert m["cpu_kernels"] == cpu_kernels
        assert m["compiled_after_warmup"] == 0


def test_processes_get_the_leaders_value_and_refuse_different_requests(tmp_path):
    same = {"mode": "agree", "requests": REQUESTS}
    specs = [dict(same, leader_value={"skip": ["r1", "r3"]}),
             dict(same, leader_value={"skip": []}, requests=REQUESTS[::-1])]
    outs = _finish(_start(tmp_path, "agree", specs), time.monotonic() + TIMEOUT_S)
    for out in outs:
        assert out["from_leader"] == {"skip": ["r1", "r3"]}
        assert out["check"] is not None and "differ between processes" in out["check"]


def test_initialize_checks_its_arguments_before_joining():
    import jax

    from batchjax.cluster import multihost

    jax.devices()  # started here: initialize must refuse rather than try to join
    for args, match in [(("localhost", 2, 0), "host:port"), (("localhost:x", 2, 0), "host:port"),
                        (("localhost:1234", 0, 0), "num_processes"),
                        (("localhost:1234", 2, 2), "process_id"),
                        (("localhost:1234", 2, 0), "before anything touches")]:
        with pytest.raises(multihost.MultihostError, match=match):
            multihost.initialize(*args)
    with pytest.raises(multihost.MultihostError, match="cpu_collectives"):
        multihost.initialize("localhost:1234", 2, 0, cpu_collectives="nccl")
    assert multihost.is_leader() and not multihost.is_initialized()
    assert multihost.fingerprint(REQUESTS) == multihost.fingerprint(json.loads(
        json.dumps(REQUESTS)))
