"""lm-evaluation-harness through batchjax: the model's three request kinds on a stand-in engine,
the command line on local tasks, and item-by-item agreement with lm-eval's own HF backend."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from batchjax.evals import BatchjaxLM  # noqa: E402
from experiments.lm_eval import with_default_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "experiments", "data", "lm_eval")


@dataclasses.dataclass
class _Score:
    logprob: float
    is_greedy: bool


@dataclasses.dataclass
class _Result:
    id: str
    text: str
    error: object = None


class FakeEngine:
    """Records what the model asks for. A pair scores -(its continuation's tokens) and is greedy
    when the continuation has one token; a prompt's text is `reply`."""

    def __init__(self, tokenizer, max_model_len=1024, reply="4\nmore"):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.config = type("C", (), {"eos_token_ids": tokenizer.eos_token_ids})()
        self.options = type("O", (), {"dtype": "float32"})()
        self.model_source, self.policy = "fake", "batchllm"
        self.reply = reply
        self.scored, self.generated, self.calls = [], [], 0

    def score(self, pairs, policy=None):
        self.calls += 1
        self.scored += [(list(c), list(x)) for c, x in pairs]
        return [_Score(-float(len(x)), len(x) == 1) for _, x in pairs]

    def generate(self, batch, policy=None):
        self.calls += 1
        self.generated += batch
        return [_Result(r["id"], self.reply) for r in batch]


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture
def fake(smollm2_tokenizer):
    engine = FakeEngine(smollm2_tokenizer)
    return engine, BatchjaxLM(engine=engine)


def test_the_model_is_registered_beside_lm_evals_own():
    from lm_eval.api.registry import get_model

    assert get_model("batchjax") is BatchjaxLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide lm-eval's


def test_loglikelihood_sends_every_pair_in_one_call_split_as_hflm_splits(fake, smollm2_tokenizer):
    engine, lm = fake
    args = [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer: ", "five"),
            ("", "Hello world")]
    out = lm.loglikelihood(_instances("loglikelihood", args), disable_tqdm=True)
    assert engine.calls == 1
    tok = smollm2_tokenizer
    for (context, continuation), (ctx, cont), (logprob, greedy) in zip(args, engine.scored, out):
        if context:
            whole = tok.encode(context + continuation)
            assert ctx + cont == whole and ctx == tok.encode(context.rstrip())
        else:
            assert ctx == [lm.prefix_token_id] and cont == tok.encode(continuation)
        assert (logprob, greedy) == (-len(cont), len(cont) == 1)


def test_a_long_pair_is_cut_from_the_left_to_max_length(smollm2_tokenizer):
    engine = FakeEngine(smollm2_tokenizer)
    lm = BatchjaxLM(engine=engine, max_length=10)
    context, continuation = list(range(100, 120)), [7, 8, 9]
    lm._loglikelihood_tokens([(("c", "x"), context, continuation)])
    (ctx, cont), = engine.scored
    assert cont == continuation and ctx == context[-8:]  # 8 + 3 = max_length + 1 tokens
    with pytest.raises(ValueError, match="max_length must be in"):
        BatchjaxLM(engine=engine, max_length=engine.max_model_len)


def test_loglikelihood_rolling_scores_every_token_once(smollm2_tokenizer):
    engine = FakeEngine(smollm2_tokenizer)
    lm = BatchjaxLM(engine=engine, max_length=16)
    texts = ["one two three " * 20, "short text", "x"]
    out = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    assert engine.calls == 1
    assert out == [-float(len(smollm2_tokenizer.encode(t))) for t in texts]
    assert all(len(c) + len(x) <= 17 for c, x in engine.scored)


def test_generate_until_passes_stops_and_limits_and_cuts_at_the_first_stop(fake):
    engine, lm = fake
    args = [("Q: 2+2?\nA:", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}),
            ("Q: 3+3?\nA:", {"until": "more", "do_sample": True, "temperature": 0.7,
                             "top_p": 0.9})]
    out = lm.generate_until(_instances("generate_until", args))
    assert out == ["4", "4\n"]
    first, second = engine.generated
    assert first["max_tokens"] == 5 and first["temperature"] == 0.0 and "\n" in first["stop"]
    assert second["max_tokens"] == lm.max_gen_toks and second["temperature"] == 0.7
    assert second["top_p"] == 0.9 and "more" in second["stop"] and second["seed"] == 1
    with pytest.raises(ValueError, match="not supported"):
        lm.generate_until(_instances("generate_until", [("Q", {"num_beams": 4})]))


def test_the_command_line_defaults_to_batchjax():
    assert with_default_model(["run", "--tasks", "t"])[-2:] == ["--model", "batchjax"]
    assert with_default_model(["--tasks", "t", "--model=hf"]) == ["--tasks", "t", "--model=hf"]
    assert with_default_model(["ls", "tasks"]) == ["ls", "tasks"]


def test_the_command_line_writes_lm_evals_results_json(tiny_llama_tok_dir, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "experiments.lm_eval", "--tasks", "batchjax_mc,batchjax_gen",
           "--include_path", TASKS, "--limit", "3", "--num_fewshot", "1", "--log_samples",
           "--model_args", f"model={tiny_llama_tok_dir},kv_budget_mb=8,max_tokens_per_step=512,"
           "progress=False", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = [p for p in out.rglob("results_*.json")]
    results = json.loads(results_file.read_text())
    assert set(results["results"]) == {"batchjax_mc", "batchjax_gen"}
    assert results["config"]["model"] == "batchjax"
    (samples,) = out.rglob("samples_batchjax_mc_*.jsonl")
    items = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(items) == 3
    for item in items:  # each item's four choices were scored, and acc follows from them
        lls = [float(r[0][0]) for r in item["resps"]]
        assert len(lls) == 4 and all(ll < 0 for ll in lls)
        assert item["acc"] == float(max(range(4), key=lambda k: lls[k]) == item["target"])
    assert results["results"]["batchjax_mc"]["acc,none"] == pytest.approx(
        sum(item["acc"] for item in items) / 3)


# -- against lm-eval's HF backend on SmolLM2 -------------------------------------------------


ROLLING_TEXTS = ("The quick brown fox jumps over the lazy dog. " * 12,
                 "Paris is the capital of France.", "Hi")


def _hf_dir(tmp):
    """SmolLM2's GGUF weights dequantized into an f32 HF directory, for lm-eval's HF backend."""
    from batchjax.bench.peers import ensure_hf_checkpoint
    from batchjax.models.registry import resolve_spec

    return ensure_hf_checkpoint(sys.executable,
                                os.path.join(REPO, "experiments", "peers", "export_hf.py"),
                                resolve_spec("smollm2-135m")[1], str(tmp / "smollm2_hf"))


def _evaluate(lm, rolling_lm):
    """lm-eval's results on both local tasks, through `lm` (an lm-eval model object), and the
    rolling loglikelihoods of ROLLING_TEXTS through `rolling_lm` (64-token windows)."""
    import lm_eval
    import lm_eval.tasks

    results = lm_eval.simple_evaluate(
        model=lm, tasks=["batchjax_mc", "batchjax_gen"],
        task_manager=lm_eval.tasks.TaskManager(include_path=TASKS), limit=8, num_fewshot=2,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0)
    samples = {task: [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in items]
               for task, items in results["samples"].items()}
    rolling = rolling_lm.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(t,) for t in ROLLING_TEXTS]), disable_tqdm=True)
    return {"results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                        for t, r in results["results"].items()}, "samples": samples,
            "rolling": [float(x) for x in rolling]}


def _logprob_diffs(engine, model):
    """Largest |batchjax - transformers| over the chosen and top-5 logprobs of a SmolLM2
    request's prompt and generated tokens (greedy, 8 tokens)."""
    import numpy as np
    import torch

    (r,) = engine.generate([{"prompt": "The three primary colours are", "max_tokens": 8,
                             "logprobs": 5, "prompt_logprobs": 5}])
    prompt = list(engine.tokenizer.encode("The three primary colours are"))
    ids = prompt + list(r.token_ids)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
    diffs = []
    entries = list(r.prompt_logprobs[1:]) + list(r.logprobs)
    for pos, entry in enumerate(entries):  # entry for ids[pos + 1], from the logits at pos
        row = want[pos]
        assert entry.token_id == ids[pos + 1]
        diffs.append(abs(entry.logprob - float(row[entry.token_id])))
        order = np.argsort(-row, kind="stable")[:5]
        diffs += [abs(v - float(row[t])) for t, v in entry.top]
        assert [t for t, _ in entry.top] == order.tolist()
    return {"max": max(diffs), "count": len(entries)}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    from tests.conftest import once_per_session

    def compute(tmp):
        import torch
        from lm_eval.models.huggingface import HFLM

        from batchjax.engine.engine import Engine

        torch.set_num_threads(2)
        hf_dir = _hf_dir(tmp)
        hf = dict(pretrained=hf_dir, dtype="float32", device="cpu")
        hf_lm = HFLM(**hf)
        out = {"hf": _evaluate(hf_lm, HFLM(**hf, max_length=64))}
        engine = Engine("smollm2-135m", dtype="float32", progress=False)
        out["batchjax"] = _evaluate(BatchjaxLM(engine=engine),
                                    BatchjaxLM(engine=engine, max_length=64))
        out["logprob_diffs"] = _logprob_diffs(engine, hf_lm.model)
        return out

    return once_per_session(tmp_path_factory, "lm_eval_both", compute)


def test_batchjax_matches_lm_evals_hf_backend_item_by_item(both, smollm2_tokenizer):
    hf, ours = both["hf"], both["batchjax"]
    for task in ("batchjax_mc", "batchjax_gen"):
        metric = "acc,none" if task == "batchjax_mc" else "exact_match,strip"
        assert ours["results"][task][metric] == hf["results"][task][metric]
    mc_hf, mc_ours = (sorted(x["samples"]["batchjax_mc"], key=lambda s: s["doc_id"])
                      for x in (hf, ours))
    assert len(mc_hf) == len(mc_ours) == 8
    for a, b in zip(mc_hf, mc_ours):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]),
                                                      (r[0] for r in b["resps"])):
            assert abs(float(ll_a) - float(ll_b)) < 1e-3
            assert greedy_a == greedy_b
    gen_hf, gen_ours = (sorted(x["samples"]["batchjax_gen"], key=lambda s: s["doc_id"])
                        for x in (hf, ours))
    assert [s["resps"] for s in gen_hf] == [s["resps"] for s in gen_ours]
    assert both["logprob_diffs"]["count"] >= 12 and both["logprob_diffs"]["max"] < 1e-4
    assert len(ours["rolling"]) == len(ROLLING_TEXTS)
    for text, a, b in zip(ROLLING_TEXTS, hf["rolling"], ours["rolling"]):
        # A sum of one logprob per token: each within the 1e-4 that f32 logprobs agree to
        # above (torch's CPU kernels differ by machine; off by a token would be whole nats).
        tokens = len(smollm2_tokenizer.encode(text))
        assert a < 0 and abs(a - b) < 1e-4 * tokens, (text[:20], a, b)
