"""A user's first job, side by side: batchjax against vLLM, each timed from process start.

    python -m experiments.bench_startup --vllm_python=$VLLM_VENV/bin/python \
        [--num_requests=256] [--kv_tokens=12288] [--dtype=float32] [--out=out/bench/startup]

The workload is the shared-document job (16 requests per 1,024-token document, 64 tokens of
question each, 32 output tokens, EOS ignored). Each system runs in a fresh process of its own
and generates the whole batch twice: the first run's last result, measured from the process's
start, includes everything a user waits for (imports, model load, compilation or warm-up); the
second run is the steady state. batchjax starts with an empty XLA compilation cache (a first
run ever; its native kernels' build is cached on the machine, as after installation). Both
hold the same KV budget in tokens. Writes `startup.json` and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from batchjax import workloads
from batchjax.bench import peers
from batchjax.bench.suite import fixed_output

_VLLM_PYTHON = flags.DEFINE_string("vllm_python", "", "Interpreter of vLLM's environment.")
_HF_MODEL_DIR = flags.DEFINE_string("hf_model_dir", "out/hf_smollm2_f32",
                                    "Where the GGUF model is exported for vLLM.")
_NUM = flags.DEFINE_integer("num_requests", 256, "Requests (a multiple of 16).")
_KV_TOKENS = flags.DEFINE_integer("kv_tokens", 12288, "KV budget of both systems, in tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and KV.")
_OUT = flags.DEFINE_string("out", "out/bench/startup", "Output directory.")
_ARM = flags.DEFINE_string("arm", "", "Internal: run batchjax's arm on this workload file.")
_KV_MB = flags.DEFINE_float("kv_budget_mb", 0.0, "Internal: the arm's KV budget.")
_ARM_OUT = flags.DEFINE_string("arm_out", "", "Internal: the arm's JSON report.")

_PEERS_DIR = os.path.join(os.path.dirname(__file__), "peers")


def _batchjax_arm() -> None:
    """In a fresh process: load, generate twice, report process-age and wall times."""
    from batchjax.engine.engine import Engine
    from batchjax.metrics import process_age_s

    with open(_ARM.value) as f:
        reqs = [json.loads(line) for line in f]
    for r in reqs:
        r["ignore_eos"] = True
        r.pop("output_len", None)
    engine = Engine("smollm2-135m", dtype=_DTYPE.value, kv_budget_mb=_KV_MB.value,
                    progress=False, compilation_cache_dir=tempfile.mkdtemp())
    runs = []
    for _ in range(2):
        results = engine.generate(reqs, policy="batchllm")
        m = dict(engine.last_metrics)
        m["since_process_start_s"] = process_age_s()
        m["token_ids"] = {r.id: list(r.token_ids) for r in results}
        runs.append(m)
    with open(_ARM_OUT.value, "w") as f:
        json.dump({"system": "batchjax", "runs": runs}, f)


def _kv_bytes_per_token(dtype: str) -> int:
    # SmolLM2-135M: 30 layers, K and V, 3 KV heads of 64.
    return 30 * 2 * 3 * 64 * (4 if dtype == "float32" else 2)


def main(argv):
    del argv
    if _ARM.value:
        _batchjax_arm()
        return
    os.makedirs(_OUT.value, exist_ok=True)
    work = fixed_output(workloads.microbenchmark(1024, 64, 32, 16, _NUM.value, seed=1))
    path = os.path.join(_OUT.value, f"{work.name}.jsonl")
    workloads.write_jsonl(work, path)
    kv_mb = _KV_TOKENS.value * _kv_bytes_per_token(_DTYPE.value) / 2**20
    report: dict = {"workload": work.name, "kv_tokens": _KV_TOKENS.value, "dtype": _DTYPE.value,
                    "kv_budget_mb": kv_mb}

    arm_out = os.path.join(_OUT.value, "batchjax.json")
    subprocess.run([sys.executable, "-m", "experiments.bench_startup", f"--arm={path}",
                    f"--kv_budget_mb={kv_mb}", f"--dtype={_DTYPE.value}",
                    f"--arm_out={arm_out}"], check=True)
    with open(arm_out) as f:
        report["batchjax"] = json.load(f)["runs"]

    reason = peers.missing_reason(_VLLM_PYTHON.value, "vllm")
    if reason is None:
        from batchjax.models.registry import NAMED_MODELS

        # The export reads the GGUF file with transformers, torch and gguf: this interpreter's
        # test environment has them, vLLM's may lack gguf.
        exporter = sys.executable if peers.missing_reason(
            sys.executable, "transformers") is None else _VLLM_PYTHON.value
        model_dir = peers.ensure_hf_checkpoint(
            exporter, os.path.join(_PEERS_DIR, "export_hf.py"),
            NAMED_MODELS["smollm2-135m"](), _HF_MODEL_DIR.value)
        vllm_out = os.path.join(_OUT.value, "vllm.json")
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get(
            "VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}"))
        subprocess.run([_VLLM_PYTHON.value, os.path.join(_PEERS_DIR, "vllm_runner.py"),
                        "--model_dir", model_dir, "--workload", f"{work.name}={path}",
                        "--dtype", _DTYPE.value, "--kv_budget_mb", str(kv_mb), "--reps", "2",
                        "--no-warm_up", "--out", vllm_out], check=True, env=env)
        with open(vllm_out) as f:
            report["vllm"] = json.load(f)["runs"]
    else:
        report["vllm_missing"] = reason
        print(f"vLLM not run: {reason}")

    bj = report["batchjax"]
    rows = [("batchjax batchllm", bj[0]["since_process_start_s"], bj[1]["wall_s"],
             bj[0]["output_tokens"])]
    if "vllm" in report:
        vl = report["vllm"]
        rows.append(("vllm (prefix caching + chunked prefill)", vl[0]["since_process_start_s"],
                     vl[1]["wall_s"], vl[0]["output_tokens"]))
        same = sum(bj[0]["token_ids"][k] == v for k, v in vl[0]["token_ids"].items())
        report["agreement"] = same / len(vl[0]["token_ids"])
    print(f"{'system':<42} {'start->last s':>13} {'tok/s':>8} {'steady s':>9} {'tok/s':>8}")
    for name, cold, steady, tokens in rows:
        print(f"{name:<42} {cold:13.1f} {tokens / cold:8.1f} {steady:9.1f} {tokens / steady:8.1f}")
    if len(rows) == 2:
        report["ratio_from_process_start"] = rows[1][1] / rows[0][1]
        report["ratio_steady"] = rows[1][2] / rows[0][2]
        print(f"batchjax / vLLM: {report['ratio_from_process_start']:.2f}x from process start, "
              f"{report['ratio_steady']:.2f}x steady; same tokens on "
              f"{report['agreement']:.0%} of requests")
    m = bj[0]
    print(f"batchjax first run: startup {m['startup_s']:.1f} s, warm-up {m['warmup_s']:.1f} s, "
          f"{m['num_compiled_shapes']} shapes, {m['compiled_after_warmup']} after warm-up, "
          f"host {m['host_s_per_step'] * 1000:.1f} ms/step, device idle "
          f"{m['device_idle_fraction']:.1%} (decode {m['decode_device_idle_fraction']:.1%})")
    with open(os.path.join(_OUT.value, "startup.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
