"""Decode-first ordering (BatchLLM): groups and requests with more decode per prefill first.

A unit (a group, or a request inside its group) has ratio R = L_decode / L_prefill. Running
large-R units first starts their decode early, so it overlaps the prefill chunks that follow.
The key is a plain function of two arrays and can be swapped for another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from batchjax.schedule.grouping import Grouping
from batchjax.schedule.step_plan import SchedRequest

# key(decode_tokens [U], prefill_tokens [U]) -> [U] scores; larger runs first.
OrderKey = Callable[[np.ndarray, np.ndarray], np.ndarray]


def decode_first_key(decode_tokens: np.ndarray, prefill_tokens: np.ndarray) -> np.ndarray:
    """R = L_decode / L_prefill."""
    return decode_tokens / np.maximum(prefill_tokens, 1)


def decode_estimates(requests: Sequence[SchedRequest]) -> np.ndarray:
    """[N] expected output length per request: its estimate, else its max_tokens."""
    return np.array(
        [
            r.max_tokens if r.decode_estimate is None else r.decode_estimate
            for r in requests
        ],
        dtype=np.float64,
    )


def order_groups(
    grouping: Grouping,
    decode: np.ndarray,
    prompt_lens: np.ndarray,
    key: OrderKey = decode_first_key,
) -> np.ndarray:
    """[G] group indices in execution order; ties keep input order (lowest request id first).

    decode: [N] decode estimate per request; prompt_lens: [N].
    A group's L_decode is its members' mean estimate and its L_prefill the tokens it computes
    (prefix once plus every suffix), so with one constant estimate the key is
    1 / (L_prefix + sum of L_distinct): groups with fewer physical prefill tokens first.
    """
    if not grouping.num_groups:
        return np.zeros(0, dtype=np.int64)
    sizes = grouping.sizes
    starts = grouping.offsets[:-1]
    members = grouping.members
    prefix_lens = grouping.prefix_len
    group_decode = np.add.reduceat(decode[members], starts) / sizes
    group_prefill = prefix_lens + np.add.reduceat(prompt_lens[members], starts) - sizes * prefix_lens
    scores = key(group_decode, group_prefill.astype(np.float64))
    return np.lexsort((members[starts], -scores))


def order_requests(
    grouping: Grouping,
    decode: np.ndarray,
    prompt_lens: np.ndarray,
    key: OrderKey = decode_first_key,
) -> np.ndarray:
    """[N] `grouping.members` reordered within each group into execution order; ties keep
    input order.

    A request's L_prefill is its own suffix: the prefix is shared and computed once.
    """
    members = grouping.members
    group_of_member = np.repeat(np.arange(grouping.num_groups), grouping.sizes)  # [N]
    own = prompt_lens[members] - grouping.prefix_len[group_of_member]
    scores = key(decode[members], own.astype(np.float64))
    return members[np.lexsort((members, -scores, group_of_member))]
