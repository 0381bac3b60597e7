"""The workloads of each benchmark suite, as token ids with fixed output lengths.

`cpu-peers` scales BatchLLM's microbenchmark (prefix/distinct/output 2000/200/100 and
2000/1000/100, degree 4 and 16, 6,400 requests) down to a 2-core CPU and a 135M model: the same
shapes at about half the prefix, a third of the output and a few dozen requests, plus the
industry-like mix and a workload without sharing. `smoke` is the same harness on a few tokens,
for tests of the harness itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from batchjax import workloads
from batchjax.workloads import Workload


def fixed_output(workload: Workload) -> Workload:
    """Every request decodes exactly its `output_len` tokens, so every system does equal work."""
    return dataclasses.replace(workload, max_tokens=workload.output_lens.copy())


def cpu_peers(quick: bool = False, vocab_size: int = 32000,
              num_requests: int | None = None) -> list[Workload]:
    """`num_requests` per workload (default 16 with `quick`, else 32); more requests than the
    KV budget holds at once is the regime where a cache-only policy loses its prefixes."""
    num = num_requests or (16 if quick else 32)
    suite = [
        workloads.microbenchmark(1024, 64, 32, 16, num, vocab_size=vocab_size, seed=1),
        workloads.microbenchmark(1024, 64, 32, 4, num, vocab_size=vocab_size, seed=2),
        workloads.microbenchmark(512, 256, 32, 16, num, vocab_size=vocab_size, seed=3),
        workloads.microbenchmark(512, 256, 32, 4, num, vocab_size=vocab_size, seed=4),
        # The paper's mix (prefix ~1570, distinct ~30, degree ~3) at a third of the prefix.
        workloads.industry_like(num_requests=num, seed=5, mean_prefix_len=512.0,
                                mean_output_len=32.0, max_tokens=64, vocab_size=vocab_size),
        workloads.no_sharing(576, 32, num, vocab_size=vocab_size, seed=6),
    ]
    return [fixed_output(w) for w in suite]


def smoke(quick: bool = False, vocab_size: int = 128,
          num_requests: int | None = None) -> list[Workload]:
    del quick, num_requests  # already as small as it gets
    suite = [
        workloads.microbenchmark(24, 4, 4, 4, 8, vocab_size=vocab_size, seed=1),
        workloads.no_sharing(16, 4, 4, vocab_size=vocab_size, seed=2),
    ]
    return [fixed_output(w) for w in suite]


def nested(quick: bool = False, vocab_size: int = 32000,
           num_requests: int | None = None) -> list[Workload]:
    """Multi-level sharing: a 512-token system prompt over 16 documents of 768 tokens x 16
    questions of 64 tokens, 32 output tokens (256 requests; `quick`: 4 documents x 8), and
    the paper's single-level microbenchmark shape beside it (`cpu-peers`' first workload),
    where the tree must lose nothing."""
    docs, questions = (4, 8) if quick else (16, 16)
    if num_requests is not None:
        questions = max(1, num_requests // docs)
    return [fixed_output(w) for w in (
        workloads.nested((512, 768, 64), (1, docs, questions), output_len=32,
                         vocab_size=vocab_size, seed=7),
        workloads.microbenchmark(1024, 64, 32, 16, 32 if not quick else 16,
                                 vocab_size=vocab_size, seed=1),
    )]


SUITES: dict[str, Callable[..., list[Workload]]] = {"cpu-peers": cpu_peers, "smoke": smoke,
                                                    "nested": nested}
