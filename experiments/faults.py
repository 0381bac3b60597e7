"""The fault campaign: kills, malformed input, hostile model files and generated workloads.

    python -m experiments.faults [--kills=20] [--workloads=1000] [--seed=0]
        [--sections=kills,malformed,hostile,load,invariants] [--load_sizes=1000,10000,100000]
        [--out=out/faults]

On a tiny random model (built here with SmolLM2's tokenizer; nothing is downloaded):
- kills: `run_batch` is SIGKILLed at `--kills` random instants of one job (from process start
  to past its end, so warm-up, before the first result, mid-run and the final rewrite are all
  hit), resumed after each, and run to the end; the final file must equal an uninterrupted
  run's, line for line, in input order (greedy and seeded sampled requests);
- malformed: every line of tests/data/malformed_lines.jsonl, between good lines, must get its
  named per-line error (or run, or be skipped) while every good line completes;
- hostile: truncated, corrupted and impossible model files must be refused with an error that
  names the file, and a chat template that reaches for Python internals must be refused by the
  sandbox;
- load: jobs of 1,000, 10,000 and 100,000 short requests (`--load_sizes`) through the
  simulator, each in a process of its own whose peak RSS is reported, and a results journal of
  the largest number of lines (its last one torn) resumed and finalized in reverse order,
  which must then hold every id once, in that order;
- invariants: `--workloads` generated workloads and budgets per policy, each checked by
  `batchjax.schedule.checking.check_invariants` (KV budget, every request finishing once with
  its output, pages freed, prefill at least the trie optimum, the same plan on a rerun).
It prints a table of what was tried and what held, writes it as JSON, and exits non-zero if
anything did not hold.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags


def _define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program: the tests
    import its helpers beside other experiments whose flags share these names."""
    global _KILLS, _WORKLOADS, _SEED, _SECTIONS, _LOAD_SIZES, _OUT
    _KILLS = flags.DEFINE_integer("kills", 20, "SIGKILLs of one job, each followed by a resume.")
    _WORKLOADS = flags.DEFINE_integer("workloads", 1000, "Generated workloads per policy.")
    _SEED = flags.DEFINE_integer("seed", 0, "Seed of kill instants and workloads.")
    _SECTIONS = flags.DEFINE_list("sections", ["kills", "malformed", "hostile", "load", "invariants"],
                                  "Which parts of the campaign to run.")
    _LOAD_SIZES = flags.DEFINE_list(
        "load_sizes", ["1000", "10000", "100000"],
        "Requests per simulated job of the load section; its journal holds the largest number.")
    _OUT = flags.DEFINE_string("out", "out/faults", "Working directory and report.")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "tests", "data", "malformed_lines.jsonl")
# Flags that keep a job long enough to be killed mid-run on a tiny model (small steps).
RUN_FLAGS = ("--max_tokens_per_step=32", "--kv_budget_mb=1", "--config.print_results=0")


def smollm2_tokenizer():
    from batchjax.models.registry import load_tokenizer

    return load_tokenizer("smollm2-135m")[0]


# -- kills ------------------------------------------------------------------------------------


def kill_job_lines(rng: np.random.Generator, max_tokens: int = 64) -> list[str]:
    """4 documents x 8 questions, half greedy and half seeded sampling, and a bad line after
    each document."""
    words = "alpha beta gamma delta river stone market garden bridge window".split()
    lines = []
    for d in range(4):
        doc = " ".join(rng.choice(words, 40))
        for q in range(8):
            # Lengths spread over the job, so results arrive one by one, not group by group.
            request = {"id": f"d{d}q{q}", "prompt": f"{doc}\nQuestion {q}: {rng.choice(words)}?",
                       "max_tokens": int(rng.integers(2, max_tokens + 1)), "ignore_eos": True}
            if q % 2:
                request.update(temperature=0.8, seed=100 * d + q)
            lines.append(json.dumps(request))
        lines.append(json.dumps({"id": f"bad{d}", "prompt": "x", "top_p": 2.0}))
    return lines


def _run_batch(model: str, inp: str, out: str, metrics: str) -> subprocess.Popen:
    # XLA's cheaper compile passes (which a test run may have set) make slower steps, and
    # here the steps dominate: a job compiles a handful of shapes, cached after the first run.
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_backend_optimization_level"))
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run_batch", f"--input={inp}", f"--output={out}",
         f"--metrics_out={metrics}", f"--model={model}", *RUN_FLAGS],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"run_batch failed ({proc.returncode}):\n{err.decode()[-3000:]}")


def _lines(path: str) -> list[bytes]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    return data.splitlines(keepends=True)


def _without_cache_counts(line: bytes) -> dict:
    """A result line less `usage.cached_prompt_tokens`, which says how much of the prompt this
    run found already computed: a resumed run shares prefixes among fewer requests."""
    value = json.loads(line)
    value.get("usage", {}).pop("cached_prompt_tokens", None)
    return value


def kill_campaign(model: str, work: str, kills: int, rng: np.random.Generator,
                  max_tokens: int = 64) -> dict:
    os.makedirs(work, exist_ok=True)
    inp = os.path.join(work, "kill_input.jsonl")
    with open(inp, "w") as f:
        f.write("\n".join(kill_job_lines(rng, max_tokens)) + "\n")
    reference, killed = os.path.join(work, "reference.jsonl"), os.path.join(work, "killed.jsonl")
    for path in (reference, killed, killed + ".lock"):
        if os.path.exists(path):
            os.remove(path)
    start = time.monotonic()
    _finish(_run_batch(model, inp, reference, os.path.join(work, "reference_metrics.json")))
    job_s = time.monotonic() - start
    total = sum(1 for line in _lines(reference) if b'"token_ids"' in line)  # results
    phases = {"during start-up": 0, "mid-run": 0, "after the last line": 0,
              "finished before the kill": 0}
    torn = 0

    def complete() -> int:
        """Whole result lines in the killed run's file (error lines come before any step)."""
        return sum(1 for line in _lines(killed)
                   if line.endswith(b"\n") and b'"token_ids"' in line)

    for k in range(kills):
        # The last two kills land once every result is written (the final rewrite and
        # summary), one in four during start-up (imports, loading, warm-up), the rest once a
        # new result or two has been written.
        plan = ("end" if k >= kills - 2 else "start-up" if k % 4 == 0 else "mid-run")
        before = complete()
        target = (total if plan == "end" else
                  before + int(rng.integers(1, 3)))
        proc = _run_batch(model, inp, killed, os.path.join(work, "killed_metrics.json"))
        if plan == "start-up":
            time.sleep(float(rng.uniform(0.1, 2.0)))
        else:
            while complete() < target and proc.poll() is None:
                time.sleep(0.002)
        if proc.poll() is not None:
            phases["finished before the kill"] += 1
            _finish(proc)
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        lines = _lines(killed)
        torn += bool(lines) and not lines[-1].endswith(b"\n")
        done = complete()
        phases["during start-up" if done == before and done < total else
               "after the last line" if done >= total else "mid-run"] += 1
    _finish(_run_batch(model, inp, killed, os.path.join(work, "killed_metrics.json")))
    want, got = _lines(reference), _lines(killed)
    return {
        "kills": kills, "job_s": job_s, "phases": phases, "torn_lines_seen": torn,
        "lines": len(got), "byte_identical": want == got,
        "identical_but_cache_counts": [_without_cache_counts(x) for x in want]
        == [_without_cache_counts(x) for x in got],
    }


# -- malformed input ------------------------------------------------------------------------


def corpus_entries(file: str) -> list[dict]:
    with open(CORPUS) as f:
        return [e for e in map(json.loads, f) if e["file"] == file]


def corpus_line(entry: dict) -> bytes:
    if "bytes_b64" in entry:
        return base64.b64decode(entry["bytes_b64"])
    if entry.get("make") == "huge_line":
        return json.dumps({"id": "huge_line", "prompt": "word " * (2 * 2**20)}).encode()
    return entry["text"].encode()


def good_line(i: int, file: str) -> bytes:
    if file == "openai":
        return json.dumps({"custom_id": f"good{i}", "method": "POST",
                           "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": f"hello {i}"}],
                                    "max_tokens": 2}}).encode()
    return json.dumps({"id": f"good{i}", "prompt": f"hello {i}", "max_tokens": 2}).encode()


def run_corpus(engine, work: str, file: str) -> list[dict]:
    """Each entry of one corpus file with what became of it: {"kind", "want", "got", "ok"}."""
    from batchjax.requests import read_requests_jsonl

    entries = corpus_entries(file)
    lines, where, good = [], [], []
    for i, entry in enumerate(entries):
        lines.append(corpus_line(entry))
        where.append(len(lines))
        lines.append(good_line(i, file))
        good.append(len(lines))
    path = os.path.join(work, f"corpus_{file}.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    requests, errors, _ = read_requests_jsonl(path, strict=file == "strict")
    by_line = {e.line: ("error", e.field, e.message) for e in errors}
    for request, result in zip(requests, engine.generate(requests)):
        by_line[request.index + 1] = (("error", result.error.field, result.error.message)
                                      if result.error is not None else ("ok", None, ""))
    report = []
    for entry, line in zip(entries, where):
        got = by_line.get(line, ("skipped", None, ""))
        want = (entry["outcome"], entry["field"])
        report.append({"kind": entry["kind"], "want": want, "got": got[:2],
                       "ok": got[:2] == want and (got[0] != "error" or bool(got[2]))})
    report.append({"kind": f"{file}: every good line", "want": ("ok", None),
                   "got": ("ok", None) if all(by_line.get(n, ("",))[0] == "ok" for n in good)
                   else ("failed", None),
                   "ok": all(by_line.get(n, ("",))[0] == "ok" for n in good)})
    return report


# -- hostile model files ----------------------------------------------------------------------

_TINY_HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128,
                hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)


def _write_hf(directory: str, config: dict = _TINY_HF) -> None:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    tensors = {"model.embed_tokens.weight": np.zeros((v, h), np.float32),
               "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        tensors[pre + "input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[pre + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            tensors[pre + name + ".weight"] = np.zeros(shape, np.float32)
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def hostile_files(work: str) -> list[tuple[str, str, str]]:
    """(kind, model path to load, the file its error must name), written under `work`."""
    from batchjax.models.registry import resolve_spec

    cases = []

    def hf_case(kind, damage, bad_file):
        directory = os.path.join(work, "hostile", kind)
        _write_hf(directory)
        damage(directory)
        cases.append((kind, directory, os.path.join(directory, bad_file)))

    def truncate(directory):
        path = os.path.join(directory, "model.safetensors")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])

    def overwrite(name, data):
        def damage(directory):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        return damage

    def config(**changes):
        return overwrite("config.json", json.dumps(dict(_TINY_HF, **changes)).encode())

    hf_case("safetensors_truncated", truncate, "model.safetensors")
    hf_case("safetensors_garbage", overwrite("model.safetensors", b"\xff" * 4096),
            "model.safetensors")
    hf_case("config_not_json", overwrite("config.json", b"{not json"), "config.json")
    hf_case("config_negative_hidden_size", config(hidden_size=-64), "config.json")
    hf_case("config_zero_heads", config(num_attention_heads=0), "config.json")
    hf_case("config_zero_vocab", config(vocab_size=0), "config.json")
    hf_case("tokenizer_not_a_tokenizer", overwrite("tokenizer.json", b'{"model": 5}'),
            "tokenizer.json")
    def good_tokenizer_bad_config(directory):
        smollm2_tokenizer().backend.save(os.path.join(directory, "tokenizer.json"))
        overwrite("tokenizer_config.json", b"[1, 2")(directory)

    hf_case("tokenizer_config_not_json", good_tokenizer_bad_config, "tokenizer_config.json")
    gguf = resolve_spec("smollm2-135m")[1]
    for kind, size in (("gguf_truncated", os.path.getsize(gguf) // 2), ("gguf_header_only", 4096),
                       ("gguf_missing_64_bytes", os.path.getsize(gguf) - 64), ("gguf_empty", 0)):
        path = os.path.join(work, "hostile", kind + ".gguf")
        with open(gguf, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read(size))
        cases.append((kind, path, path))
    return cases


EVIL_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


def check_hostile(work: str) -> list[dict]:
    import jinja2

    from batchjax.models.config import ModelFileError
    from batchjax.models.registry import load_model
    from batchjax.models.tokenizer import Tokenizer

    report = []
    for kind, path, bad_file in hostile_files(work):
        try:
            load_model(path)
            got, ok = "loaded", False
        except ModelFileError as e:
            got, ok = str(e), e.path == bad_file
        except Exception as e:  # noqa: BLE001 - anything else is a finding
            got, ok = f"{type(e).__name__}: {e}", False
        report.append({"kind": kind, "got": got[:160], "ok": ok})
    tokenizer = smollm2_tokenizer()
    evil = Tokenizer(tokenizer.backend, eos_token_ids=tokenizer.eos_token_ids,
                     chat_template=EVIL_TEMPLATE)
    try:
        evil.apply_chat_template([{"role": "user", "content": "hi"}])
        got, ok = "rendered", False
    except jinja2.exceptions.SecurityError as e:
        got, ok = f"SecurityError: {e}", True
    report.append({"kind": "chat_template_reaching_python_internals", "got": got[:160],
                   "ok": ok})
    return report


# -- under load -------------------------------------------------------------------------------

_SIMULATE_N = """
import sys, time
from batchjax import workloads
from batchjax.sim.simulate import simulate
n = int(sys.argv[1])
start = time.perf_counter()
result = simulate(workloads.microbenchmark(32, 8, 4, 8, n, seed=0), "batchllm")
m = result.metrics
assert m["num_requests"] == n and m["output_tokens"] == 4 * n, m
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
with open("/proc/self/status") as f:
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(time.perf_counter() - start, peak_kib * 1024)
"""


def load_campaign(work: str, sizes=(1_000, 10_000, 100_000)) -> dict:
    """Jobs of `sizes` short requests through the simulator (a subprocess each: its peak RSS
    is the job's), and a results journal of the largest size reopened (resumed) and finalized."""
    from batchjax.engine.results import Result, ResultsJournal, to_output_line
    from batchjax.requests import InputFormat

    jobs = []
    for n in sizes:
        proc = subprocess.run([sys.executable, "-c", _SIMULATE_N, str(n)], cwd=REPO,
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"simulating {n} requests failed:\n{proc.stderr[-2000:]}")
        seconds, rss = proc.stdout.split()
        jobs.append({"requests": n, "seconds": float(seconds), "peak_rss_mib": int(rss) / 2**20})
    n = sizes[-1]
    path = os.path.join(work, "load_journal.jsonl")
    for stale in (path, path + ".lock"):
        if os.path.exists(stale):
            os.remove(stale)
    # The lines a run would have appended (written in one go here: 100,000 fsyncs measure the
    # disk, not the resume), the last one torn as a kill leaves it.
    with open(path, "wb") as f:
        for i in range(n):
            result = Result(id=f"r{i}", index=i, text=f"answer {i}", token_ids=(5, 6, 2),
                            finish_reason="stop", prompt_tokens=40, completion_tokens=3,
                            cached_prompt_tokens=32, error=None)
            f.write(json.dumps(to_output_line(result, InputFormat.NATIVE)).encode() + b"\n")
        f.write(b'{"id": "r-torn", "te')
    start = time.perf_counter()
    journal = ResultsJournal(path, InputFormat.NATIVE)
    resumed = len(journal.finished_ids)
    resume_s = time.perf_counter() - start
    start = time.perf_counter()
    journal.finalize([f"r{i}" for i in reversed(range(n))])
    finalize_s = time.perf_counter() - start
    journal.close()
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    # Every id exactly once, in the order finalize was given, and the torn line gone: one
    # parse per line, about a second at 100,000 lines.
    ordered = [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in reversed(range(n))]
    return {"jobs": jobs, "journal_lines": n, "resumed": resumed, "resume_s": resume_s,
            "finalize_s": finalize_s, "journal_ok": resumed == n and ordered}


# -- invariants -------------------------------------------------------------------------------


def invariant_campaign(workloads: int, rng: np.random.Generator) -> dict:
    from batchjax.schedule.checking import check_invariants, random_workload, tight_budgets
    from batchjax.schedule.policies import POLICIES

    report = {}
    for policy in POLICIES:
        violations = []
        for k in range(workloads):
            requests, output_lens = random_workload(rng)
            budgets = tight_budgets(requests, int(rng.choice([1, 2, 4])), int(rng.integers(0, 7)))
            broken = check_invariants(policy, requests, output_lens, budgets,
                                      overlap=bool(k % 2))
            if broken:
                violations.append({"workload": k, "broken": broken})
        report[policy] = {"workloads": workloads, "violations": len(violations),
                          "examples": violations[:3]}
    return report


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(_SEED.value)
    work = os.path.abspath(_OUT.value)
    os.makedirs(work, exist_ok=True)
    report: dict = {}
    rows: list[tuple[str, str, str, bool]] = []  # (category, tried, held, ok)
    sections = set(_SECTIONS.value)
    model = None
    if sections & {"kills", "malformed"}:
        from batchjax.models.tiny import make_tiny_model

        model = make_tiny_model(os.path.join(work, "tiny_model"))
    if "kills" in sections:
        k = report["kills"] = kill_campaign(model, work, _KILLS.value, rng)
        rows.append(("kills", f"{k['kills']} SIGKILLs ({', '.join(f'{n} {p}' for p, n in k['phases'].items())})",
                     f"final file {'byte-identical' if k['byte_identical'] else 'identical except cache counts' if k['identical_but_cache_counts'] else 'DIFFERENT'}; {k['torn_lines_seen']} torn lines repaired",
                     k["identical_but_cache_counts"]))
    if "malformed" in sections:
        from batchjax.engine.engine import Engine

        engine = Engine(model, page_size=8, kv_budget_mb=4.0, max_tokens_per_step=256,
                        progress=False)
        corpus = [x for f in ("native", "strict", "openai") for x in run_corpus(engine, work, f)]
        report["malformed"] = corpus
        kinds = [x for x in corpus if not x["kind"].endswith("every good line")]
        held = sum(x["ok"] for x in corpus)
        rows.append(("malformed input", f"{len(kinds)} kinds of line "
                     f"({sum(x['want'][0] == 'error' for x in kinds)} errors)",
                     f"{held} of {len(corpus)} as expected (good lines included)",
                     held == len(corpus)))
    if "hostile" in sections:
        hostile = report["hostile"] = check_hostile(work)
        held = sum(x["ok"] for x in hostile)
        rows.append(("hostile files", f"{len(hostile)} files and templates",
                     f"{held} refused naming the file (or by the sandbox)", held == len(hostile)))
    if "load" in sections:
        load = report["load"] = load_campaign(work, tuple(int(n) for n in _LOAD_SIZES.value))
        rss = ", ".join(f"{j['requests']:,}: {j['peak_rss_mib']:.0f} MiB in {j['seconds']:.1f} s"
                        for j in load["jobs"])
        rows.append(("under load", f"simulated jobs of {rss}",
                     f"journal of {load['journal_lines']:,} lines resumed in "
                     f"{load['resume_s']:.2f} s, finalized in {load['finalize_s']:.2f} s",
                     load["journal_ok"]))
    if "invariants" in sections:
        inv = report["invariants"] = invariant_campaign(_WORKLOADS.value, rng)
        bad = sum(v["violations"] for v in inv.values())
        rows.append(("invariants", f"{_WORKLOADS.value} workloads x {len(inv)} policies",
                     f"{bad} violations", bad == 0))
    width = max(len(r[1]) for r in rows) if rows else 10
    print(f"\n{'category':<16} {'tried':<{width}}  held")
    for category, tried, held, ok in rows:
        print(f"{category:<16} {tried:<{width}}  {held}{'' if ok else '   <-- FAILED'}")
    for x in report.get("malformed", []) + report.get("hostile", []):
        if not x["ok"]:
            print(f"  not as expected: {x}")
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {os.path.join(work, 'report.json')}")
    if not all(r[3] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
