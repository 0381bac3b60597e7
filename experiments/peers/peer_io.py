"""What a peer runner reads and writes; imported by the runners inside the peers' interpreters.

The peers (vLLM, transformers) run from their own virtual environments, which have neither
batchjax nor absl, so this module uses the standard library only. A runner reads one or more
token-id JSONL workloads (`{"id", "prompt_token_ids", "max_tokens", "output_len"}`), generates
exactly `output_len` tokens per request greedily with EOS ignored, and writes one JSON report:

    {"system", "config", "versions", "runs": [
        {"workload", "rep", "wall_s", "num_requests", "prompt_tokens", "output_tokens",
         "computed_prefill_tokens" (or null), "output_tokens_per_s", "total_tokens_per_s",
         "load_average_1m",
         "token_ids": {request id: [...]} (first repetition only; later ones repeat it),
         "same_tokens_as_first_rep" (later repetitions only)}]}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from typing import Any


@dataclasses.dataclass(frozen=True)
class PeerRequest:
    """One request as every system sees it: prompt token ids and a fixed output length."""

    id: str
    prompt_token_ids: tuple[int, ...]
    output_len: int


def read_requests(path: str) -> list[PeerRequest]:
    """Reads a token-id JSONL workload; the fixed output length is `output_len` if present."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            requests.append(
                PeerRequest(
                    id=str(record["id"]),
                    prompt_token_ids=tuple(int(t) for t in record["prompt_token_ids"]),
                    output_len=int(record.get("output_len", record["max_tokens"])),
                )
            )
    return requests


def parse_workload_arg(value: str) -> tuple[str, str]:
    """`NAME=PATH` -> (name, path)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The flags every runner takes, so the harness drives them all the same way."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model_dir", required=True, help="HF directory (config, weights, tokenizer)")
    parser.add_argument("--workload", action="append", type=parse_workload_arg, required=True,
                        help="NAME=PATH of a token-id JSONL workload; repeatable")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--kv_budget_mb", type=float, required=True)
    parser.add_argument("--max_tokens_per_step", type=int, default=512)
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--warm_up", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed call first; without it the first run pays every "
                             "lazy start-up cost, as a user's first job does")
    return parser


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where that cannot be read; as
    `batchjax.metrics.process_age_s`, which the peers' interpreters cannot import."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_record(
    workload: str,
    rep: int,
    requests: list[PeerRequest],
    token_ids: dict[str, list[int]],
    wall_s: float,
    computed_prefill_tokens: int | None,
    first_rep_token_ids: dict[str, list[int]] | None,
) -> dict[str, Any]:
    """One timed run; token ids are kept in full only for the first repetition."""
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(len(token_ids[r.id]) for r in requests)
    record: dict[str, Any] = {
        "workload": workload,
        "rep": rep,
        "wall_s": wall_s,
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "computed_prefill_tokens": computed_prefill_tokens,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
        # Other work on the same cores slows every system; the 1-minute load shows how much.
        "load_average_1m": os.getloadavg()[0],
    }
    if first_rep_token_ids is None:
        record["token_ids"] = token_ids
    else:
        record["same_tokens_as_first_rep"] = token_ids == first_rep_token_ids
    return record


def check_lengths(requests: list[PeerRequest], token_ids: dict[str, list[int]]) -> None:
    """A peer that stops early would inflate its tokens/s; fail loudly instead."""
    for r in requests:
        got = len(token_ids.get(r.id, ()))
        if got != r.output_len:
            raise RuntimeError(f"request {r.id}: {got} tokens generated, {r.output_len} expected")


def write_report(path: str, system: str, config: dict[str, Any], versions: dict[str, str],
                 runs: list[dict[str, Any]]) -> None:
    versions = {"python": sys.version.split()[0], "platform": platform.platform(), **versions}
    report = {"system": system, "config": config, "versions": versions, "runs": runs}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f)
    os.replace(tmp, path)
