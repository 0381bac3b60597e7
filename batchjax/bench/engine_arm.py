"""batchjax's own arm of a benchmark: every policy on the same engine, reported like a peer."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Sequence

from batchjax.bench.peers import PeerOutcome
from batchjax.workloads import Workload

POLICIES = ("batchllm", "vllm", "sglang", "none")
# Arms that are a policy with a plan option: BatchLLM's single level beside the tree.
VARIANTS = {"batchllm-1level": ("batchllm", {"prefix_levels": 1})}


def arm(name: str) -> tuple[str, dict[str, Any]]:
    """(policy, generate options) of a `--policies` entry."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name not in POLICIES:
        raise ValueError(f"unknown batchjax arm {name!r}: one of {POLICIES + tuple(VARIANTS)}")
    return name, {}


def request_dicts(workload: Workload) -> list[dict[str, Any]]:
    """Greedy requests that decode exactly `output_len` tokens, ids as in the JSONL form."""
    return [
        {"id": f"{workload.name}-{i}", "prompt_token_ids": prompt.tolist(),
         "max_tokens": int(n), "ignore_eos": True, "temperature": 0.0}
        for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens))
    ]


def utilisation(metrics: dict[str, Any], roofline_gflops: float) -> dict[str, float | None]:
    """Model FLOP utilisation of a run against a matmul rate: over the whole run, and over its
    prefill steps (any prompt tokens) and decode-only steps, each timed whole."""
    def mfu(gflops_per_s: float | None) -> float | None:
        return None if gflops_per_s is None else gflops_per_s / roofline_gflops

    wall = metrics["wall_s"]
    return {"mfu": mfu(metrics["model_flops"] / 1e9 / wall if wall > 0 else None),
            "mfu_prefill": mfu(metrics.get("prefill_gflops_per_s")),
            "mfu_decode": mfu(metrics.get("decode_gflops_per_s"))}


def system_name(policy: str) -> str:
    return f"batchjax {policy}"


def run_batchjax(
    model: str,
    workloads: Sequence[Workload],
    *,
    dtype: str,
    reps: int,
    kv_budget_mb: float,
    max_tokens_per_step: int,
    policies: Sequence[str] = POLICIES,
    warmup: bool = True,
) -> list[PeerOutcome]:
    """One engine per dtype; each policy runs each workload `reps` times after a warm-up run,
    the repetitions of the policies interleaved.

    The warm-up compiles the step shapes that policy needs for that workload, as vLLM compiles
    before its first request; the timed runs then report `new_compiled_shapes` (0 expected).
    """
    import jax.numpy as jnp

    from batchjax.bench.roofline import matmul_gflops
    from batchjax.engine.engine import Engine
    from batchjax.engine.page_pool import kv_bytes_per_page

    engine = Engine(model, dtype=dtype, kv_budget_mb=kv_budget_mb,
                    max_tokens_per_step=max_tokens_per_step, progress=False)
    page_bytes = kv_bytes_per_page(engine.config, engine.options.page_size, jnp.dtype(dtype))
    config = {"model": model, "dtype": dtype, "attention": engine.options.attention,
              "cpu_kernels": engine.step.cpu_kernels,
              "page_size": engine.options.page_size, "kv_budget_mb": kv_budget_mb,
              "kv_budget_pages": engine.kv_budget_pages,
              "max_tokens_per_step": max_tokens_per_step,
              "max_num_seqs": engine.options.max_num_seqs, "warmup": warmup}
    versions = {"batchjax": importlib.metadata.version("batchjax")}
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in policies}
    for workload in workloads:
        requests = request_dicts(workload)
        if warmup:
            for policy in policies:
                name, options = arm(policy)
                engine.generate(requests, policy=name, **options)
        # Utilisation is against the f32 matmul rate measured now, beside this workload's runs.
        roofline = matmul_gflops(2048, 5)
        first: dict[str, dict[str, list[int]]] = {}
        # Repetition-major: each repetition runs every policy in turn, so a slow drift of the
        # machine (or the first timed run after the warm-ups) weighs on every policy alike.
        for rep in range(reps):
            for policy in policies:
                name, options = arm(policy)
                results = engine.generate(requests, policy=name, **options)
                metrics = engine.last_metrics
                token_ids = {r.id: list(r.token_ids) for r in results}
                failed = [r.id for r in results if r.error is not None]
                if failed:
                    raise RuntimeError(f"batchjax {policy} failed requests {failed[:5]}")
                run = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
                run.update(workload=workload.name, rep=rep, num_requests=len(results),
                           prompt_tokens=metrics["logical_prefill_tokens"],
                           peak_kv_bytes=int(metrics["peak_kv_pages"]) * page_bytes,
                           load_average_1m=os.getloadavg()[0], matmul_gflops=roofline,
                           **utilisation(metrics, roofline))
                if policy not in first:
                    run["token_ids"] = token_ids
                    first[policy] = token_ids
                else:
                    run["same_tokens_as_first_rep"] = token_ids == first[policy]
                runs[policy].append(run)
                print(f"{system_name(policy)} {dtype} {workload.name} rep {rep}: "
                      f"{metrics['wall_s']:.2f} s", flush=True)
    outcomes = []
    for policy in policies:
        report = {"system": system_name(policy), "config": {**config, "policy": policy},
                  "versions": versions, "runs": runs[policy]}
        outcomes.append(PeerOutcome(system_name(policy), dtype, "ok", None, report, None))
    return outcomes
