"""One job on many (forced host) devices: tensor parallel, data parallel and both give the
one-device greedy tokens, keep the saving ratio, and hold the KV budget on every replica;
every placement of the embedding table and the LM head gives them too.

The host device count is fixed when JAX starts, so each model's configurations run in one
subprocess (`tests/multidevice_worker.py`) with 4 host devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import once_per_session

SMALL = {"page_size": 4, "kv_budget_mb": 1.0, "max_tokens_per_step": 32}
TINY_CONFIGS = [
    dict(SMALL),                                                    # 0: one device
    dict(SMALL, tensor_parallel=2),                                 # 1
    dict(SMALL, tensor_parallel=2, cpu_kernels="xla"),              # 2
    dict(SMALL, tensor_parallel=4),                                 # 3: KV heads replicated
    dict(SMALL, data_parallel=2),                                   # 4
    dict(SMALL, tensor_parallel=2, data_parallel=2),                # 5
    dict(SMALL, data_parallel=2, policy="vllm"),                    # 6
    dict(SMALL, tensor_parallel=2, attention="pallas"),             # 7
    dict(SMALL, data_parallel=2, kv_budget_mb=0.04),                # 8: a tight budget
]
# Every (embedding table, LM head) placement of `batchjax.sharding.rules`, at T=2 on the tiny
# model and at T=3 on one whose vocabulary (100) and hidden size (64) do not split over 3
# devices, so both are padded ("odd": its own one-device run is the reference).
PLACEMENTS = [f"{table}/{head}" for table in ("replicated", "vocab", "embed")
              for head in ("vocab", "embed")]
ODD = "odd"  # the odd model's directory, filled in by `tiny_runs`
PLACED_CONFIGS = (
    [dict(SMALL, tensor_parallel=2, placement=p) for p in PLACEMENTS]
    + [dict(SMALL, tensor_parallel=2, cpu_kernels="xla", placement="vocab/embed"),
       dict(SMALL, model=ODD)]
    + [dict(SMALL, model=ODD, tensor_parallel=3, placement=p) for p in PLACEMENTS]
    + [dict(SMALL, model=ODD, tensor_parallel=3, cpu_kernels="xla", placement="embed/embed")])
ODD_REFERENCE = len(TINY_CONFIGS) + PLACED_CONFIGS.index(dict(SMALL, model=ODD))


def _run(model: str, num_devices: int, configs, path) -> dict:
    out = os.path.join(path, "out.json")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "tests.multidevice_worker", model, str(num_devices),
                    json.dumps(configs), out], check=True, cwd=root, env=env, timeout=900)
    with open(out) as f:
        return json.load(f)


def _odd_llama(path) -> str:
    """A tiny random Llama (tied) of 3 query heads of 16 and one KV head, a vocabulary of 100
    and a hidden size of 64: neither splits over 3 devices."""
    from flax import nnx

    from batchjax.models.checkpoint import save_checkpoint
    from batchjax.models.config import ModelConfig
    from batchjax.models.llama import LlamaForCausalLM

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=3, num_kv_heads=1, head_dim=16, rope_theta=10000.0,
        rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,))
    save_checkpoint(str(path), config, LlamaForCausalLM(config, rngs=nnx.Rngs(1)), None)
    return str(path)


@pytest.fixture(scope="module")
def tiny_runs(tiny_llama_dir, tmp_path_factory):
    def run(d):
        odd = _odd_llama(d / "odd_llama")
        placed = [dict(c, model=odd) if c.get("model") == ODD else c for c in PLACED_CONFIGS]
        return _run(str(tiny_llama_dir), 4, TINY_CONFIGS + placed, d)

    return once_per_session(tmp_path_factory, "multidevice_tiny", run)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_mesh_gives_the_one_device_tokens(tiny_runs, k):
    one, run = tiny_runs["0"], tiny_runs[str(k)]
    assert run["ids"] == one["ids"]
    assert run["tokens"] == one["tokens"], f"config {TINY_CONFIGS[k]}"
    t = TINY_CONFIGS[k].get("tensor_parallel", 1)
    d = TINY_CONFIGS[k].get("data_parallel", 1)
    m = run["metrics"]
    assert (m["tensor_parallel"], m["data_parallel"], m["num_devices"]) == (t, d, t * d)
    assert m["compiled_after_warmup"] == 0


@pytest.mark.parametrize("i", range(len(PLACED_CONFIGS)))
def test_every_placement_of_the_table_and_head_gives_the_one_device_tokens(tiny_runs, i):
    config = PLACED_CONFIGS[i]
    k = len(TINY_CONFIGS) + i
    one = tiny_runs[str(ODD_REFERENCE if config.get("model") == ODD else 0)]
    run = tiny_runs[str(k)]
    assert run["ids"] == one["ids"]
    assert run["tokens"] == one["tokens"], f"config {config}"
    if "placement" in config:
        assert "/".join(run["placement"]) == config["placement"]
    assert run["metrics"]["tensor_parallel"] == config.get("tensor_parallel", 1)
    assert run["metrics"]["compiled_after_warmup"] == 0


@pytest.mark.parametrize("k", [4, 5])
def test_replicas_keep_the_saving_ratio_and_split_the_work(tiny_runs, k):
    one, run = tiny_runs["0"]["metrics"], tiny_runs[str(k)]
    assert abs(run["metrics"]["saving_ratio"] - one["saving_ratio"]) <= 0.01
    assert run["metrics"]["computed_prefill_tokens"] == one["computed_prefill_tokens"]
    replicas = run["replicas"]
    # The planner splits the groups; which replica runs each is timing (a dry one steals).
    assert len(replicas) == 2 and all(r["planned_groups"] > 0 for r in replicas)
    assert sum(r["groups"] for r in replicas) == sum(r["planned_groups"] for r in replicas)
    assert sum(r["requests"] for r in replicas) == one["num_requests"]


def test_every_replica_holds_its_kv_budget(tiny_runs):
    for k in ("4", "5", "8"):
        for r in tiny_runs[k]["replicas"]:
            assert r["peak_kv_pages"] <= r["kv_budget_pages"]
    assert tiny_runs["8"]["metrics"]["kv_budget_pages"] < tiny_runs["4"]["metrics"][
        "kv_budget_pages"]


@pytest.mark.slow
def test_smollm2_over_three_devices_gives_the_one_device_tokens(tmp_path_factory):
    """SmolLM2's 9 query and 3 KV heads, one KV head per device."""
    small = dict(SMALL, kv_budget_mb=8.0, max_tokens=6)
    configs = [small, dict(small, tensor_parallel=3)]
    runs = once_per_session(tmp_path_factory, "multidevice_smollm2",
                            lambda d: _run("smollm2-135m", 3, configs, d))
    assert runs["1"]["tokens"] == runs["0"]["tokens"]
    assert runs["1"]["metrics"]["tensor_parallel"] == 3
