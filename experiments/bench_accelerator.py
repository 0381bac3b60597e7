"""The engine on an accelerator against transformers' `generate` and the simulator.

    python -m experiments.bench_accelerator [--shape=llama-3.1-8b] [--num_docs=64] \
        [--questions=16] [--doc_tokens=1024] [--question_tokens=64] [--max_tokens=32] \
        [--kv_budget_mb=16384] [--max_tokens_per_step=2048] [--attention=xla] \
        [--systems=batchjax,transformers] [--out=out/bench/accelerator]

A random-weight model of a real shape (bf16; nothing is downloaded or read from disk) serves
a shared-document workload: `num_docs` documents, each followed by `questions` questions,
every request generating exactly `max_tokens` tokens (EOS ignored). Each system runs in a
process of its own, so neither holds the other's memory:

- batchjax runs the job twice in one engine: the first run from the engine's construction
  (compilation and warm-up included), then the steady state. It reports output tokens/s,
  its compiled shapes, the host's time per step beside the step's, and the device-idle
  fraction.
- transformers' `generate` (sdpa attention, the same shape and dtype, random weights of its
  own) runs the requests in batches of `hf_batch` after one warm-up batch.
- the simulator replays the same workload on the device's roofline profile with the
  engine's KV pages and step size (`--sim_device`, default: from the device's name), and the
  steady run's output tokens/s is compared with its estimate.

Every arm writes its JSON as soon as it ends (`out/<arm>.json`), so a run cut short keeps
what finished; `report.md` holds the table. `--shape=tiny` runs the whole thing on a CPU in
seconds (a check of the script, not a measurement).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_SHAPE = flags.DEFINE_string("shape", "llama-3.1-8b",
                             "A model shape of batchjax.sim.hardware.MODELS, or 'tiny'.")
_DOCS = flags.DEFINE_integer("num_docs", 64, "Shared documents.")
_QUESTIONS = flags.DEFINE_integer("questions", 16, "Questions per document.")
_DOC_TOKENS = flags.DEFINE_integer("doc_tokens", 1024, "Tokens of each document.")
_Q_TOKENS = flags.DEFINE_integer("question_tokens", 64, "Tokens of each question.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Output tokens of each request.")
_KV_MB = flags.DEFINE_float("kv_budget_mb", 16384, "batchjax's KV budget (MiB).")
_STEP_TOKENS = flags.DEFINE_integer("max_tokens_per_step", 2048, "batchjax's tokens per step.")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "pallas"], "batchjax's attention.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and KV.")
_SYSTEMS = flags.DEFINE_list("systems", ["batchjax", "transformers"], "Systems to run.")
_HF_BATCH = flags.DEFINE_integer("hf_batch", 64, "transformers: requests per generate call.")
_SIM_DEVICE = flags.DEFINE_string("sim_device", None,
                                  "The simulator's device profile (default: from the name of "
                                  "the device; none for a CPU).")
_OUT = flags.DEFINE_string("out", "out/bench/accelerator", "Output directory.")
_ARM_TIMEOUT = flags.DEFINE_integer("arm_timeout", 300, "Seconds one system may take before "
                                    "it is stopped and the others run.")
_ARM = flags.DEFINE_string("arm", None, "Internal: run one system in this process.")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16)


def model_sizes(shape: str) -> dict:
    """The decoder's sizes: a simulator shape's, or the tiny one."""
    if shape == "tiny":
        return dict(TINY)
    from batchjax.sim.hardware import get_model

    m = get_model(shape)
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim)


def make_workload(vocab_size: int):
    """The shared-document job as a batchjax `Workload` (token ids, shuffled)."""
    from batchjax import workloads

    return workloads.nested(segment_lens=(_DOC_TOKENS.value, _Q_TOKENS.value),
                            fanouts=(_DOCS.value, _QUESTIONS.value),
                            output_len=_MAX_TOKENS.value, vocab_size=vocab_size, seed=0)


def _write(name: str, data: dict) -> None:
    with open(os.path.join(_OUT.value, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)


def run_batchjax(sizes: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from batchjax.engine.engine import Engine
    from batchjax.models.config import ModelConfig
    from batchjax.models.llama import LlamaForCausalLM
    from batchjax.models.registry import LoadedModel

    dtype = jnp.dtype(_DTYPE.value)
    config = ModelConfig(architecture="LlamaForCausalLM", rope_theta=500000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192,
                         tie_word_embeddings=False, **sizes)
    started = time.perf_counter()
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))  # on the default device
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - started
    engine = Engine(loaded=LoadedModel(config, model, None, "random", "random"),
                    dtype=_DTYPE.value, attention=_ATTENTION.value, kv_budget_mb=_KV_MB.value,
                    max_tokens_per_step=_STEP_TOKENS.value, progress=False)
    del model
    work = make_workload(config.vocab_size)
    requests = [{"id": str(i), "prompt_token_ids": p.tolist(), "max_tokens": int(n),
                 "ignore_eos": True} for i, (p, n) in enumerate(zip(work.prompts, work.max_tokens))]
    runs = []
    for label in ("first", "steady"):
        t0 = time.perf_counter()
        results = engine.generate(requests)
        wall = time.perf_counter() - t0
        m = engine.last_metrics
        bad = [r.id for r in results if len(r.token_ids) != _MAX_TOKENS.value]
        if bad:
            raise SystemExit(f"requests {bad[:5]} did not generate {_MAX_TOKENS.value} tokens")
        steps = m["num_steps"]
        runs.append({
            "run": label, "wall_s": wall, "output_tokens": m["output_tokens"],
            "output_tokens_per_s": m["output_tokens"] / wall, "steps": steps,
            "step_ms": 1e3 * m["busy_s"] / steps if steps else 0.0,
            "host_ms_per_step": 1e3 * m["host_s_per_step"],
            "device_idle_fraction": m["device_idle_fraction"],
            "decode_device_idle_fraction": m["decode_device_idle_fraction"],
            "warmup_s": m["warmup_s"], "num_compiled_shapes": m["num_compiled_shapes"],
            "compiled_after_warmup": m["compiled_after_warmup"],
            "computed_prefill_tokens": m["computed_prefill_tokens"],
            "saving_ratio": m["saving_ratio"]})
    return {"system": "batchjax", "device": str(jax.devices()[0].device_kind),
            "init_s": init_s, "kv_budget_pages": engine.kv_budget_pages,
            "max_tokens_per_step": _STEP_TOKENS.value, "page_size": engine.options.page_size,
            "attention": _ATTENTION.value, "runs": runs}


def run_transformers(sizes: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, _DTYPE.value)
    config = LlamaConfig(
        vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"], num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"], num_key_value_heads=sizes["num_kv_heads"],
        head_dim=sizes["head_dim"], rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    started = time.perf_counter()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    init_s = time.perf_counter() - started
    work = make_workload(sizes["vocab_size"])
    prompts = [torch.tensor(p, dtype=torch.long) for p in work.prompts]
    batch = _HF_BATCH.value

    def generate(chunk) -> int:
        width = max(len(p) for p in chunk)  # left padding (the workload's prompts are equal)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=_MAX_TOKENS.value,
                                 min_new_tokens=_MAX_TOKENS.value, do_sample=False,
                                 pad_token_id=0)
        return int((out.shape[1] - width) * out.shape[0])

    generate(prompts[:batch])  # warm-up: kernels chosen, memory pools grown
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = sum(generate(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"system": "transformers", "device": torch.cuda.get_device_name() if device == "cuda"
            else "cpu", "init_s": init_s, "batch": batch, "wall_s": wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall}


def simulate_job(sizes: dict, engine: dict) -> dict | None:
    from batchjax.sim.cost_model import CostModel
    from batchjax.sim.hardware import ModelShape, get_device, profile_for
    from batchjax.sim.simulate import simulate

    name = _SIM_DEVICE.value or profile_for(engine["device"])
    if not name:
        return None
    shape = ModelShape(_SHAPE.value, sizes["num_layers"], sizes["hidden_size"],
                       sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"],
                       sizes["intermediate_size"], sizes["vocab_size"],
                       bytes_per_value=2 if _DTYPE.value == "bfloat16" else 4)
    result = simulate(make_workload(sizes["vocab_size"]), "batchllm",
                      page_size=engine["page_size"],
                      max_tokens_per_step=engine["max_tokens_per_step"],
                      kv_budget_pages=engine["kv_budget_pages"],
                      cost=CostModel(get_device(name), shape))
    m = result.metrics
    return {"sim_device": name, "simulated_s": m["simulated_s"],
            "output_tokens_per_s": m["output_tokens_per_s"], "steps": m["num_steps"],
            "computed_prefill_tokens": m["computed_prefill_tokens"]}


def report(results: dict) -> str:
    lines = [f"shape {_SHAPE.value} ({_DTYPE.value}), {_DOCS.value} documents of "
             f"{_DOC_TOKENS.value} tokens x {_QUESTIONS.value} questions of "
             f"{_Q_TOKENS.value}, {_MAX_TOKENS.value} output tokens each",
             "", "| system | run | wall s | output tok/s | steps | step ms | host ms per step "
             "| device idle |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    bj = results.get("batchjax")
    if bj:
        for r in bj["runs"]:
            lines.append(f"| batchjax ({bj['attention']}) | {r['run']} | {r['wall_s']:.2f} | "
                         f"{r['output_tokens_per_s']:,.1f} | {r['steps']} | {r['step_ms']:.2f} "
                         f"| {r['host_ms_per_step']:.2f} | {r['device_idle_fraction']:.1%} |")
    hf = results.get("transformers")
    if hf:
        lines.append(f"| transformers generate (batch {hf['batch']}) | after a warm-up batch | "
                     f"{hf['wall_s']:.2f} | {hf['output_tokens_per_s']:,.1f} | | | | |")
    sim = results.get("simulator")
    if sim:
        lines.append(f"| simulator ({sim['sim_device']}, estimate) | | {sim['simulated_s']:.2f} "
                     f"| {sim['output_tokens_per_s']:,.1f} | {sim['steps']} | | | |")
    lines.append("")
    if bj:
        steady = bj["runs"][-1]
        lines.append(f"batchjax: {steady['num_compiled_shapes']} compiled shapes, "
                     f"{steady['compiled_after_warmup']} after warm-up; first run's warm-up "
                     f"{bj['runs'][0]['warmup_s']:.1f} s; host time "
                     f"{steady['host_ms_per_step'] / max(steady['step_ms'], 1e-9):.1%} of a step")
        if hf:
            lines.append(f"batchjax steady over transformers: "
                         f"{steady['output_tokens_per_s'] / hf['output_tokens_per_s']:.2f}x; "
                         f"first run (warm-up included): "
                         f"{bj['runs'][0]['output_tokens_per_s'] / hf['output_tokens_per_s']:.2f}x")
        if sim:
            error = steady["output_tokens_per_s"] / sim["output_tokens_per_s"] - 1
            lines.append(f"measured against the simulator's estimate: {error:+.1%}")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    sizes = model_sizes(_SHAPE.value)
    if _ARM.value:  # a child: one system, its JSON written before it exits
        run = {"batchjax": run_batchjax, "transformers": run_transformers}[_ARM.value]
        _write(_ARM.value, run(sizes))
        return
    results, failed = {}, []
    for system in _SYSTEMS.value:
        argv = [sys.executable, "-m", "experiments.bench_accelerator", f"--arm={system}",
                *[a for a in sys.argv[1:] if not a.startswith("--systems")]]
        try:
            code = subprocess.run(argv, timeout=_ARM_TIMEOUT.value).returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
        path = os.path.join(_OUT.value, f"{system}.json")
        if code == 0 and os.path.exists(path):
            with open(path) as f:
                results[system] = json.load(f)
        else:
            failed.append(system)
            print(f"{system} failed (exit {code}); the others still run", file=sys.stderr)
    if "batchjax" in results:
        sim = simulate_job(sizes, results["batchjax"])
        if sim:
            results["simulator"] = sim
            _write("simulator", sim)
    text = report(results)
    with open(os.path.join(_OUT.value, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    app.run(main)
