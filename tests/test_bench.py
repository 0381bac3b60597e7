"""The benchmark harness measures every system on the same work and never hides a missing one."""

import json
import os
import subprocess
import sys

import pytest

from batchjax.bench import engine_arm, machine, peers, report, suite
from batchjax.bench.peers import PeerOutcome
from batchjax.kernels import native as native_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.path.join(REPO, "experiments", "peers")


@pytest.fixture
def peer_modules(monkeypatch):
    """The runner modules as their own interpreters import them (script directory on the path)."""
    monkeypatch.syspath_prepend(PEERS_DIR)
    import hf_runner
    import peer_io

    return peer_io, hf_runner


def _fake_outcome(system, dtype, wall_by_rep, token_ids, computed=None, prompt_tokens=100,
                  **extra):
    runs = []
    for rep, wall in enumerate(wall_by_rep):
        run = {"workload": "w", "rep": rep, "wall_s": wall, "num_requests": len(token_ids),
               "prompt_tokens": prompt_tokens, "output_tokens": 8,
               "computed_prefill_tokens": computed, "output_tokens_per_s": 8 / wall,
               "total_tokens_per_s": (prompt_tokens + 8) / wall, **extra}
        if rep == 0:
            run["token_ids"] = token_ids
        else:
            run["same_tokens_as_first_rep"] = True
        runs.append(run)
    report_ = {"system": system, "config": {}, "versions": {}, "runs": runs}
    return PeerOutcome(system, dtype, "ok", None, report_, None)


def test_workload_jsonl_round_trips_through_the_peer_reader(tmp_path, peer_modules):
    peer_io, _ = peer_modules
    workload = suite.smoke()[0]
    path = tmp_path / "w.jsonl"
    from batchjax.workloads import write_jsonl

    write_jsonl(workload, path)
    requests = peer_io.read_requests(str(path))
    assert [r.id for r in requests] == [d["id"] for d in engine_arm.request_dicts(workload)]
    assert [list(r.prompt_token_ids) for r in requests] == [p.tolist() for p in workload.prompts]
    assert [r.output_len for r in requests] == workload.output_lens.tolist()


def test_peer_report_keeps_first_rep_tokens_and_checks_later_reps(tmp_path, peer_modules):
    peer_io, _ = peer_modules
    requests = [peer_io.PeerRequest("a", (1, 2, 3), 2), peer_io.PeerRequest("b", (4,), 2)]
    tokens = {"a": [5, 6], "b": [7, 8]}
    first = peer_io.run_record("w", 0, requests, tokens, 2.0, 4, None)
    later = peer_io.run_record("w", 1, requests, {"a": [5, 6], "b": [7, 9]}, 1.0, 4, tokens)
    assert first["token_ids"] == tokens and first["output_tokens_per_s"] == 2.0
    assert first["total_tokens_per_s"] == (4 + 4) / 2.0
    assert "token_ids" not in later and later["same_tokens_as_first_rep"] is False
    out = tmp_path / "r.json"
    peer_io.write_report(str(out), "peer", {"dtype": "float32"}, {"peer": "1"}, [first, later])
    written = json.loads(out.read_text())
    assert written["system"] == "peer" and len(written["runs"]) == 2
    assert "python" in written["versions"]


def test_a_peer_that_stops_early_is_an_error(peer_modules):
    peer_io, _ = peer_modules
    with pytest.raises(RuntimeError, match="1 tokens generated, 2 expected"):
        peer_io.check_lengths([peer_io.PeerRequest("a", (1,), 2)], {"a": [3]})


def test_transformers_batches_fit_the_kv_budget(peer_modules):
    peer_io, hf_runner = peer_modules
    requests = [peer_io.PeerRequest(str(i), tuple(range(10 + 7 * i)), 4 + i % 3)
                for i in range(20)]
    budget, per_token = 3000, 2
    batches = hf_runner.pack_batches(requests, budget, per_token)
    assert sorted(r.id for b in batches for r in b) == sorted(r.id for r in requests)
    for b in batches:
        width = max(len(r.prompt_token_ids) for r in b) + max(r.output_len for r in b)
        assert len(b) * width * per_token <= budget
    with pytest.raises(ValueError, match="alone needs more KV"):
        hf_runner.pack_batches(requests, 10, per_token)


def test_an_absent_interpreter_or_package_is_a_reason_not_a_crash(tmp_path):
    assert "not found" in peers.missing_reason(str(tmp_path / "no-python"), "vllm")
    assert "not installed" in peers.missing_reason(sys.executable, "no_such_package_xyz")
    assert peers.missing_reason(sys.executable, "json") is None
    spec = peers.PeerSpec("vllm (test)", "vllm", str(tmp_path / "no-python"), "runner.py")
    outcome = peers.run_peer(spec, {}, model_dir="m", dtype="float32", reps=1, kv_budget_mb=1,
                             max_tokens_per_step=8, num_threads=1, out_dir=str(tmp_path))
    assert outcome.status == "missing" and outcome.report is None


def test_utilisation_divides_model_flops_per_second_by_the_roofline():
    metrics = {"wall_s": 2.0, "model_flops": 8e9, "prefill_gflops_per_s": 6.0,
               "decode_gflops_per_s": None}
    assert engine_arm.utilisation(metrics, 10.0) == {
        "mfu": pytest.approx(0.4), "mfu_prefill": pytest.approx(0.6), "mfu_decode": None}


def test_table_json_and_charts_report_ratios_agreement_and_missing_systems(tmp_path):
    tokens = {"r0": [1, 2], "r1": [3, 4]}
    outcomes = [
        _fake_outcome("batchjax batchllm", "float32", [1.0, 1.1, 0.9], tokens, computed=40,
                      mfu_prefill=0.8, mfu_decode=0.45, host_s_per_step=0.0042,
                      decode_device_idle_fraction=0.031),
        _fake_outcome(report.REFERENCE_SYSTEM, "float32", [2.0, 2.0, 2.0],
                      {"r0": [1, 2], "r1": [3, 5]}, computed=70),
        PeerOutcome("transformers", "float32", "missing", "interpreter /x not found", None, None),
    ]
    written = report.write_results(str(tmp_path), suite="smoke", command="python -m bench",
                                   machine={"date": "today"}, settings={}, outcomes=outcomes)
    rows = {r.system: r for r in report.summarize(outcomes)}
    ours = rows["batchjax batchllm"]
    assert ours.ratio_to_reference == pytest.approx(2.0)
    assert ours.saving_ratio == pytest.approx(0.6)
    assert ours.output_tokens_per_s_spread == pytest.approx((8 / 0.9 - 8 / 1.1) / 8)
    assert rows[report.REFERENCE_SYSTEM].agreement == 0.5
    assert (ours.mfu_prefill, ours.mfu_decode) == (0.8, 0.45)
    assert rows[report.REFERENCE_SYSTEM].mfu_prefill is None
    table_rows = {line.split(" | ")[1]: line for line in written["table"].splitlines()
                  if line.startswith("| w |")}
    assert table_rows["batchjax batchllm"].endswith("| 80% / 45% | 4.2 | 3.1% |")
    assert table_rows[report.REFERENCE_SYSTEM].endswith("| - / - | - | - |")
    assert "transformers (float32): **missing**: interpreter /x not found" in written["table"]
    raw = json.loads((tmp_path / "results.json").read_text())
    assert {s["status"] for s in raw["systems"]} == {"ok", "missing"}
    for name in ("output_tokens_per_s_float32.png", "ratio_to_vllm_float32.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_smoke_suite_runs_every_policy_and_transformers_and_reports_vllm_missing(
        tmp_path, tiny_llama_dir):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "experiments.bench", "--suite=smoke", f"--out={out}",
           f"--model={tiny_llama_dir}", f"--vllm_python={tmp_path / 'no-vllm-python'}",
           f"--hf_python={sys.executable}", "--reps=2", "--dtypes=float32",
           "--kv_budget_mb=1", "--max_tokens_per_step=32", "--cores=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SKIPPED vllm (prefix caching + chunked prefill) (float32): missing" in proc.stdout
    raw = json.loads((out / "results.json").read_text())
    status = {(s["system"], s["dtype"]): s["status"] for s in raw["systems"]}
    for policy in engine_arm.POLICIES:
        assert status[(f"batchjax {policy}", "float32")] == "ok"
    assert status[("transformers", "float32")] == "ok"
    assert status[(report.REFERENCE_SYSTEM, "float32")] == "missing"
    rows = raw["summary"]
    assert {r["workload"] for r in rows} == {w.name for w in suite.smoke()}
    for r in rows:
        assert r["reps"] == 2 and r["output_tokens_per_s"] > 0
        # f32 greedy on identical weights: every system decodes the same tokens.
        assert r["agreement"] == 1.0, r
        ours = r["system"].startswith("batchjax")
        for key in ("mfu_prefill", "mfu_decode", "host_s_per_step"):
            assert (r[key] is not None and r[key] > 0) if ours else r[key] is None, r
        idle = r["decode_device_idle"]  # None for a run with no decode-only step
        assert (idle is None or 0 <= idle < 1) if ours else idle is None, r
    assert any(r["decode_device_idle"] is not None for r in rows)
    shared = [r for r in rows if r["system"] == "batchjax batchllm"
              and r["workload"].startswith("micro")]
    assert shared[0]["saving_ratio"] > 0.5
    assert (out / "results.md").exists() and (out / "output_tokens_per_s_float32.png").exists()


def test_vllm_pc_is_vllm_with_prefix_caching_only():
    from experiments.bench import system_specs

    both = system_specs("vllm", "0-1", "/venv/python", "/hf/python")
    only = system_specs("vllm-pc", "0-1", "/venv/python", "/hf/python")
    assert [s.system for s in both] == [report.REFERENCE_SYSTEM,
                                        "vllm (no prefix caching, no chunked prefill)"]
    assert only == both[:1]
    assert "--prefix_caching" in only[0].args and only[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    with pytest.raises(ValueError, match="unknown system"):
        system_specs("vllm-fast", "0-1", "/venv/python", "/hf/python")


def test_the_machine_record_names_the_cpu_generation_and_its_vector_units(tmp_path):
    details = machine.machine_info()["cpu_details"]
    assert set(details["simd"]) <= set(machine._SIMD_FLAGS)
    if native_kernels.cpu_has_avx2_fma():  # what /proc/cpuinfo says, read another way
        assert {"avx2", "fma"} <= set(details["simd"]) and details["family"]
    written = report.write_results(
        str(tmp_path), suite="smoke", command="c", outcomes=[], settings={},
        machine={"date": "today", "cpu": "AMD EPYC", "usable_cores": 2,
                 "cpu_details": {"family": "23", "model": "1", "simd": ["avx2", "fma"]}})
    header = open(written["markdown"], encoding="utf-8").readline()
    assert "AMD EPYC family 23 model 1 (avx2, fma), 2 cores" in header


def test_accelerator_bench_runs_each_system_in_its_own_process_and_compares(tmp_path):
    """`experiments.bench_accelerator` (run on a GPU when one is lent) on a tiny random shape on
    the CPU: every request gets its tokens on both systems, the engine compiles nothing after
    warm-up, and the simulator's estimate for the same job is reported beside them."""
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "experiments.bench_accelerator", "--shape=tiny",
           "--num_docs=2", "--questions=3", "--doc_tokens=40", "--question_tokens=8",
           "--max_tokens=5", "--kv_budget_mb=4", "--max_tokens_per_step=64", "--hf_batch=4",
           "--dtype=float32", "--sim_device=h200", f"--out={out}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batchjax = json.loads((out / "batchjax.json").read_text())
    assert [r["run"] for r in batchjax["runs"]] == ["first", "steady"]
    for run in batchjax["runs"]:
        assert run["output_tokens"] == 6 * 5 and run["compiled_after_warmup"] == 0
        assert run["saving_ratio"] > 0.5  # the two documents are computed once each
    hf = json.loads((out / "transformers.json").read_text())
    assert hf["output_tokens"] == 6 * 5
    sim = json.loads((out / "simulator.json").read_text())
    assert sim["computed_prefill_tokens"] == batchjax["runs"][1]["computed_prefill_tokens"]
    text = (out / "report.md").read_text()
    assert "transformers generate" in text and "simulator's estimate" in text


def test_attention_bench_times_the_cascade_at_depth_two_against_one(tmp_path):
    """`bench_attention --cascade_root` (the GPU check of multi-level sharing) on a CPU, in
    interpret mode: both depths give each request's attention over its whole context."""
    cmd = [sys.executable, "-m", "experiments.bench_attention", "--device=cpu",
           "--cascade_root=32", "--prefix_len=64", "--groups=3", "--degree=4",
           "--suffix_len=16", "--q_heads=4", "--kv_heads=2", "--head_dim=16", "--iters=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = float(proc.stdout.split("per-request oracle| = ")[1].split()[0])
    assert error < 1e-5
    assert "depth 2 (root once" in proc.stdout and "depth 1 over depth 2:" in proc.stdout
