"""Logprobs, prompt logprobs, scoring and n samples: equal to transformers' log-softmax, and
independent of the batch and the policy a request runs in."""

import numpy as np
import pytest

from batchjax.engine.engine import Engine
from batchjax.engine.results import to_output_line
from batchjax.requests import InputFormat, InvalidRequestError, parse_request

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

POLICIES = ("batchllm", "vllm", "none")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(str(tiny_llama_dir), page_size=4, kv_budget_mb=1.0, max_tokens_per_step=32,
                  progress=False)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32).eval()


def _hf_logprobs(model, ids) -> np.ndarray:
    """[len(ids), V]: row i is the f32 log-softmax of the logits after ids[: i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def _prompts(seed=0):
    """Two documents with two questions each, and one prompt of its own."""
    rng = np.random.default_rng(seed)
    prompts = []
    for first in (3, 4):
        doc = [first] + rng.integers(5, 128, size=29).tolist()
        for _ in range(2):
            prompts.append(doc + rng.integers(5, 128, size=rng.integers(2, 6)).tolist())
    prompts.append([5] + rng.integers(5, 128, size=12).tolist())
    return prompts


def _check_entry(entry, want_row, token, k):
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(want_row[token]), abs=1e-4)
    order = np.argsort(-want_row, kind="stable")[:k]
    assert [t for t, _ in entry.top] == order.tolist()
    np.testing.assert_allclose([v for _, v in entry.top], want_row[order], atol=1e-4)
    assert entry.argmax == int(np.argmax(want_row))


@pytest.mark.parametrize("policy", POLICIES)
def test_logprobs_of_generated_and_prompt_tokens_equal_transformers(engine, hf_model, policy):
    prompts = _prompts()
    requests = [{"id": f"r{i}", "prompt_token_ids": p, "max_tokens": 6, "ignore_eos": True,
                 "logprobs": 5, "prompt_logprobs": 3} for i, p in enumerate(prompts)]
    results = engine.generate(requests, policy=policy)
    for p, r in zip(prompts, results):
        want = _hf_logprobs(hf_model, list(p) + list(r.token_ids))
        assert r.token_ids == tuple(int(np.argmax(want[len(p) - 1 + j])) for j in range(6))
        assert len(r.logprobs) == len(r.token_ids)
        for j, (entry, token) in enumerate(zip(r.logprobs, r.token_ids)):
            _check_entry(entry, want[len(p) - 1 + j], token, 5)
        assert len(r.prompt_logprobs) == len(p) and r.prompt_logprobs[0] is None
        for i in range(1, len(p)):
            _check_entry(r.prompt_logprobs[i], want[i - 1], p[i], 3)


def test_max_tokens_zero_scores_the_prompt_without_generating(engine, hf_model):
    p = _prompts()[4]
    (r,) = engine.generate([{"prompt_token_ids": p, "max_tokens": 0, "prompt_logprobs": 0}])
    assert r.token_ids == () and r.completion_tokens == 0 and r.logprobs is None
    want = _hf_logprobs(hf_model, p)
    got = [lp.logprob for lp in r.prompt_logprobs[1:]]
    np.testing.assert_allclose(got, [want[i - 1, p[i]] for i in range(1, len(p))], atol=1e-4)
    assert all(lp.top == () for lp in r.prompt_logprobs[1:])


def test_processed_logprobs_are_of_the_filtered_distribution(engine, hf_model):
    p = _prompts()[4]
    temperature, top_k = 0.7, 4
    (r,) = engine.generate([{"prompt_token_ids": p, "max_tokens": 4, "ignore_eos": True,
                             "temperature": temperature, "top_k": top_k, "seed": 3,
                             "logprobs": 6, "logprobs_mode": "processed"}])
    want = _hf_logprobs(hf_model, list(p) + list(r.token_ids))
    for j, entry in enumerate(r.logprobs):
        scaled = want[len(p) - 1 + j] / temperature
        kept = np.argsort(-scaled)[:top_k]
        processed = np.full_like(scaled, -np.inf)
        processed[kept] = scaled[kept] - np.logaddexp.reduce(scaled[kept])
        assert entry.token_id in kept.tolist()
        assert entry.logprob == pytest.approx(float(processed[entry.token_id]), abs=1e-4)
        # Only the kept tokens are possible: the rest of the list is -inf.
        finite = [(t, v) for t, v in entry.top if np.isfinite(v)]
        assert sorted(t for t, _ in finite) == sorted(kept.tolist())
        np.testing.assert_allclose([v for _, v in finite], processed[[t for t, _ in finite]],
                                   atol=1e-4)
    line = to_output_line(r, InputFormat.NATIVE)
    assert all(t["logprob"] is None for t in line["logprobs"][0]["top_logprobs"][top_k:])


def test_score_shares_each_context_and_equals_unshared_sums(engine, hf_model):
    rng = np.random.default_rng(5)
    contexts = [[first] + rng.integers(5, 128, size=31).tolist() for first in (3, 4, 5)]
    pairs = [(ctx, rng.integers(5, 128, size=int(rng.integers(1, 5))).tolist())
             for ctx in contexts for _ in range(4)]
    # One continuation is the greedy one.
    greedy_next = int(np.argmax(_hf_logprobs(hf_model, contexts[0])[-1]))
    pairs[0] = (contexts[0], [greedy_next])
    scores = engine.score(pairs)
    computed = engine.last_metrics["computed_prefill_tokens"]
    for (ctx, cont), score in zip(pairs, scores):
        want = _hf_logprobs(hf_model, ctx + cont)
        per_token = [want[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
        assert score.num_tokens == len(cont)
        np.testing.assert_allclose(score.token_logprobs, per_token, atol=1e-4)
        assert score.logprob == pytest.approx(float(np.sum(per_token)), abs=1e-4)
        greedy = all(int(np.argmax(want[len(ctx) - 1 + j])) == t for j, t in enumerate(cont))
        assert score.is_greedy == greedy
    assert scores[0].is_greedy
    # Each context once (but its last token, which scores the continuation's first), then
    # every continuation with that token.
    assert computed == sum(len(c) - 1 for c in contexts) + sum(1 + len(c) for _, c in pairs)
    alone = [engine.score([pair])[0] for pair in pairs[:3]]
    for a, b in zip(alone, scores):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_score_rejects_a_bad_pair_by_its_position(engine):
    with pytest.raises(InvalidRequestError, match="pair 1: the continuation has no tokens"):
        engine.score([([3, 4], [5]), ([3, 4], [])])


def _sampled(engine, requests, policy):
    return {r.id: r for r in engine.generate(requests, policy=policy)}


def test_n_samples_do_not_depend_on_the_batch_or_the_policy(engine):
    prompts = _prompts()
    asked = {"id": "many", "prompt_token_ids": prompts[4], "max_tokens": 8, "ignore_eos": True,
             "n": 5, "temperature": 1.0, "seed": 11, "logprobs": 1}
    others = [{"id": f"o{i}", "prompt_token_ids": p, "max_tokens": 5, "ignore_eos": True,
               "temperature": 0.8, "seed": i} for i, p in enumerate(prompts[:4])]
    alone = _sampled(engine, [asked], "batchllm")["many"]
    assert len(alone.samples) == 5 and [s.index for s in alone.samples] == list(range(5))
    assert len({s.token_ids for s in alone.samples}) > 1  # the samples draw apart
    assert alone.completion_tokens == 40
    for policy in POLICIES:
        mixed = _sampled(engine, others + [asked], policy)["many"]
        assert [s.token_ids for s in mixed.samples] == [s.token_ids for s in alone.samples]
        for a, b in zip(mixed.samples, alone.samples):
            np.testing.assert_allclose([lp.logprob for lp in a.logprobs],
                                       [lp.logprob for lp in b.logprobs], atol=1e-5)
    # The prompt is computed once for the five samples: each repeats only its last token.
    engine.generate([asked])
    assert engine.last_metrics["computed_prefill_tokens"] == len(prompts[4]) - 1 + 5


def test_output_lines_hold_samples_and_logprobs(engine):
    p = _prompts()[4]
    (r,) = engine.generate([{"id": "x", "prompt_token_ids": p, "max_tokens": 3, "n": 2,
                             "temperature": 1.0, "logprobs": 2, "ignore_eos": True}])
    line = to_output_line(r, InputFormat.NATIVE)
    assert [o["index"] for o in line["outputs"]] == [0, 1] and "text" not in line
    entry = line["outputs"][1]["logprobs"][0]
    assert set(entry) == {"token_id", "logprob", "top_logprobs"}
    assert len(entry["top_logprobs"]) == 2
    assert line["usage"]["completion_tokens"] == 6
    chat = to_output_line(r, InputFormat.OPENAI_CHAT, token_text=lambda t: f"<{t}>")
    choices = chat["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    content = choices[0]["logprobs"]["content"]
    assert content[0]["token"] == f"<{r.samples[0].token_ids[0]}>"
    assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2


def test_bad_eval_fields_name_their_field():
    for obj, field in [({"prompt": "x", "logprobs": 21}, "logprobs"),
                       ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
                       ({"prompt": "x", "n": 65}, "n"), ({"prompt": "x", "n": 0}, "n"),
                       ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                       ({"prompt": "x", "logprobs_mode": "cooked"}, "logprobs_mode")]:
        with pytest.raises(InvalidRequestError) as e:
            parse_request(obj, 0)
        assert e.value.field == field
