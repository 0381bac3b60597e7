"""Synthetic batch workloads (token ids, seeded) and their token-id JSONL form.

Each workload also carries every request's true output length (`output_lens`), which a
simulator replays; the engine only sees `max_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from batchjax.schedule.prefix_tree import TokenBatch
from batchjax.schedule.step_plan import SchedRequest


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """A batch of token-id prompts with their decode limits and true output lengths."""

    name: str
    prompts: TokenBatch  # N prompts; prompts[i] is an int32 array
    output_lens: np.ndarray  # [N] int64, true output length to simulate
    max_tokens: np.ndarray  # [N] int64, decode limit the engine is told

    def __len__(self) -> int:
        return len(self.prompts)

    def to_sched_requests(self) -> list[SchedRequest]:
        return [
            SchedRequest(tuple(prompt.tolist()), int(max_tokens))
            for prompt, max_tokens in zip(self.prompts, self.max_tokens)
        ]

    @property
    def logical_prefill_tokens(self) -> int:
        return self.prompts.total_tokens


def _shared_rows(
    rng: np.random.Generator,
    prefixes: np.ndarray,
    group_of_row: np.ndarray,
    distinct_len: int,
    vocab_size: int,
) -> np.ndarray:
    """[N, P + D] rows: the group's prefix [G, P] followed by a random distinct part."""
    num_rows = len(group_of_row)
    prefix_len = prefixes.shape[1]
    rows = np.empty((num_rows, prefix_len + distinct_len), dtype=np.int32)
    # Filled in slabs so the temporaries stay small next to a multi-GB result.
    slab = 1 << 16
    for start in range(0, num_rows, slab):
        stop = min(start + slab, num_rows)
        rows[start:stop, :prefix_len] = prefixes[group_of_row[start:stop]]
        rows[start:stop, prefix_len:] = rng.integers(
            0, vocab_size, size=(stop - start, distinct_len), dtype=np.int32
        )
    return rows


def microbenchmark(
    prefix_len: int,
    distinct_len: int,
    output_len: int,
    sharing_degree: int,
    num_requests: int,
    vocab_size: int = 32000,
    shuffle: bool = True,
    seed: int = 0,
) -> Workload:
    """BatchLLM's microbenchmark: num_requests / sharing_degree groups of equal shape.

    Each group has a random shared prefix, each request a random distinct part; all prompts
    have the same length, so they are stored as one [N, prefix + distinct] block.
    """
    if num_requests % sharing_degree:
        raise ValueError(f"num_requests={num_requests} is not a multiple of {sharing_degree=}")
    if distinct_len < 1:
        raise ValueError("distinct_len must be >= 1: every request keeps a token of its own")
    rng = np.random.default_rng(seed)
    num_groups = num_requests // sharing_degree
    prefixes = rng.integers(0, vocab_size, size=(num_groups, prefix_len), dtype=np.int32)
    group_of_row = np.repeat(np.arange(num_groups), sharing_degree)
    if shuffle:
        group_of_row = rng.permutation(group_of_row)
    rows = _shared_rows(rng, prefixes, group_of_row, distinct_len, vocab_size)
    return Workload(
        name=(
            f"micro_p{prefix_len}_d{distinct_len}_o{output_len}"
            f"_s{sharing_degree}_n{num_requests}"
        ),
        prompts=TokenBatch.from_padded(rows),
        output_lens=np.full(num_requests, output_len, dtype=np.int64),
        max_tokens=np.full(num_requests, output_len, dtype=np.int64),
    )


def no_sharing(
    prompt_len: int,
    output_len: int,
    num_requests: int,
    vocab_size: int = 32000,
    seed: int = 0,
) -> Workload:
    """Independent random prompts: only chance collisions in the first tokens are shared."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab_size, size=(num_requests, prompt_len), dtype=np.int32)
    return Workload(
        name=f"no_sharing_p{prompt_len}_o{output_len}_n{num_requests}",
        prompts=TokenBatch.from_padded(rows),
        output_lens=np.full(num_requests, output_len, dtype=np.int64),
        max_tokens=np.full(num_requests, output_len, dtype=np.int64),
    )


def _lognormal_lengths(
    rng: np.random.Generator, mean: float, sigma: float, size: int, low: int, high: int
) -> np.ndarray:
    """Integer lengths with the given mean (before clipping) and a long right tail."""
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, size)), low, high).astype(np.int64)


def industry_like(
    num_requests: int = 8000,
    seed: int = 0,
    mean_prefix_len: float = 1570.0,
    mean_distinct_len: float = 30.0,
    mean_sharing_degree: float = 3.0,
    unshared_fraction: float = 0.1,
    num_instructions: int = 8,
    mean_output_len: float = 80.0,
    max_tokens: int = 512,
    vocab_size: int = 32000,
) -> Workload:
    """A mix shaped like BatchLLM's industry snippet workload.

    Groups have uneven sharing degrees (1 + geometric, mean `mean_sharing_degree`) and
    long-tailed prefix lengths; each group's prefix opens with one of a few instruction
    headers, so groups overlap in a short common head and the tree is nested, as prompts built
    from a handful of templates are. A fraction of requests shares nothing. Requests are
    shuffled.
    """
    rng = np.random.default_rng(seed)
    num_unshared = int(round(num_requests * unshared_fraction))
    degrees: list[int] = []
    remaining = num_requests - num_unshared
    if mean_sharing_degree < 2:
        raise ValueError("a shared group has at least two requests: mean_sharing_degree >= 2")
    while remaining > 0:
        degree = min(1 + int(rng.geometric(1.0 / (mean_sharing_degree - 1.0))), remaining)
        degrees.append(degree)
        remaining -= degree
    degrees.extend([1] * num_unshared)
    num_groups = len(degrees)

    header_lens = rng.integers(32, 256, size=num_instructions)
    headers = [rng.integers(0, vocab_size, size=n, dtype=np.int32) for n in header_lens]
    prefix_lens = _lognormal_lengths(rng, mean_prefix_len, 0.5, num_groups, 300, 16000)
    header_of_group = rng.integers(0, num_instructions, size=num_groups)

    prompts: list[np.ndarray] = []
    for group, degree in enumerate(degrees):
        header = headers[header_of_group[group]]
        body = rng.integers(
            0, vocab_size, size=max(int(prefix_lens[group]) - len(header), 1), dtype=np.int32
        )
        prefix = np.concatenate([header, body])
        distinct_lens = _lognormal_lengths(rng, mean_distinct_len, 0.6, degree, 1, 512)
        for distinct_len in distinct_lens:
            distinct = rng.integers(0, vocab_size, size=int(distinct_len), dtype=np.int32)
            prompts.append(np.concatenate([prefix, distinct]))
    permutation = rng.permutation(num_requests)
    output_lens = _lognormal_lengths(rng, mean_output_len, 0.8, num_requests, 1, max_tokens)
    return Workload(
        name=f"industry_like_n{num_requests}",
        prompts=TokenBatch.from_sequences([prompts[i] for i in permutation]),
        output_lens=output_lens,
        max_tokens=np.full(num_requests, max_tokens, dtype=np.int64),
    )


def nested(
    segment_lens: tuple[int, ...] = (512, 768, 64),
    fanouts: tuple[int, ...] = (1, 16, 16),
    output_len: int = 32,
    vocab_size: int = 32000,
    shuffle: bool = True,
    seed: int = 0,
) -> Workload:
    """Prompts that nest: `fanouts[0]` random segments of `segment_lens[0]` tokens, each
    followed by `fanouts[1]` of `segment_lens[1]`, and so on; every path is one prompt.

    The default is a system prompt over 16 documents over 16 questions each (256 requests):
    sharing at two levels, then each question's own tokens. Segment lengths may be tuples
    of (low, high) ranges drawn per segment instead of one length.
    """
    if len(segment_lens) != len(fanouts) or not fanouts:
        raise ValueError("segment_lens and fanouts need one entry per level")
    rng = np.random.default_rng(seed)

    def draw(level: int) -> np.ndarray:
        n = segment_lens[level]
        if isinstance(n, tuple):
            n = int(rng.integers(n[0], n[1] + 1))
        return rng.integers(0, vocab_size, size=n, dtype=np.int32)

    prompts: list[np.ndarray] = []

    def expand(level: int, head: np.ndarray) -> None:
        for _ in range(fanouts[level]):
            path = np.concatenate([head, draw(level)])
            if level + 1 == len(fanouts):
                prompts.append(path)
            else:
                expand(level + 1, path)

    expand(0, np.zeros(0, dtype=np.int32))
    if shuffle:
        prompts = [prompts[i] for i in rng.permutation(len(prompts))]
    num = len(prompts)
    shape = "x".join(f"{n}" if not isinstance(n, tuple) else f"{n[0]}-{n[1]}"
                     for n in segment_lens)
    return Workload(
        name=f"nested_{shape}_f{'x'.join(map(str, fanouts))}",
        prompts=TokenBatch.from_sequences(prompts),
        output_lens=np.full(num, output_len, dtype=np.int64),
        max_tokens=np.full(num, output_len, dtype=np.int64),
    )


def write_jsonl(workload: Workload, path: str | os.PathLike[str]) -> None:
    """One line per request: {"id", "prompt_token_ids", "max_tokens", "output_len"}."""
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(workload.prompts):
            line = {
                "id": f"{workload.name}-{i}",
                "prompt_token_ids": prompt.tolist(),
                "max_tokens": int(workload.max_tokens[i]),
                "output_len": int(workload.output_lens[i]),
            }
            f.write(json.dumps(line, separators=(",", ":")) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> Workload:
    """Reads what `write_jsonl` writes; `output_len` defaults to `max_tokens`."""
    prompts: list[list[int]] = []
    output_lens: list[int] = []
    max_tokens: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            prompts.append(record["prompt_token_ids"])
            max_tokens.append(int(record["max_tokens"]))
            output_lens.append(int(record.get("output_len", record["max_tokens"])))
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return Workload(
        name=name,
        prompts=TokenBatch.from_sequences(prompts),
        output_lens=np.asarray(output_lens, dtype=np.int64),
        max_tokens=np.asarray(max_tokens, dtype=np.int64),
    )
