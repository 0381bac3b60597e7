"""The XLA shared-prefix paged attention equals plain attention over prefix + own tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchjax.attention import xla
from batchjax.attention.metadata import (
    PREFIX_LARGE_BLOCK,
    own_block_queries,
    split_prefix_queries,
)
from batchjax.engine import step_batch
from batchjax.engine.step_batch import build_step_batch
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.step_plan import ChunkWork, PrefixRef, StepPlan

PAGE = 4
HQ, HKV, D = 4, 2, 8


def _naive(q, keys, vals):
    """q: [Hq, D] vs keys/vals [K, Hkv, D], no mask."""
    rep = HQ // HKV
    k = np.repeat(keys, rep, axis=1)
    v = np.repeat(vals, rep, axis=1)
    s = np.einsum("hd,khd->hk", q, k) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hk,khd->hd", p, v)


def _ceil(n, q):
    return -(-n // q)


# Ways to cut the groups' prefix queries into blocks: (small size, [(large, small) per group]).
_SPLITS = {
    "small blocks of 4": lambda queries, pad: (4, [(0, _ceil(n, 4)) for n in queries]),
    "small blocks of 16": lambda queries, pad: (16, [(0, _ceil(n, 16)) for n in queries]),
    "large blocks only": lambda queries, pad: (
        16, [(_ceil(n, PREFIX_LARGE_BLOCK), 0) for n in queries]),
    "chosen (large and small in one group)": split_prefix_queries,
}


@pytest.mark.parametrize("own_q", [64, 128])
@pytest.mark.parametrize("split", sorted(_SPLITS))
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_attention_matches_full_context_attention(seed, split, own_q,
                                                                monkeypatch):
    """Every way of cutting the prefix queries into blocks, and either own-part block size,
    gives the same attention (group 0 has 71 queries: one large block and the rest in small
    ones when chosen; the 70-token chunk fills two 64-query own blocks or one of 128)."""
    monkeypatch.setattr(step_batch, "split_prefix_queries", _SPLITS[split])
    monkeypatch.setattr(step_batch, "own_block_queries", lambda lens, pad: own_q)
    rng = np.random.default_rng(seed)
    num_pages = 40
    k_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    # Group 0: prefix of 7 tokens on pages 1,2. Group 1: prefix of 1 token on page 3.
    prefixes = (PrefixRef(0, (1, 2), 7), PrefixRef(1, (3,), 1))
    chunks = (
        # decode token of a group-0 member with 5 own tokens already there (pages 4, 5; page
        # 34 is held for tokens to come: no key of it is visible yet)
        ChunkWork(0, (11,), 5, (4, 5, 34), 0, 7, True, True),
        # a 70-token suffix chunk of a group-0 member, starting at own index 2 (pages 16..33)
        ChunkWork(1, tuple(range(70)), 2, tuple(range(16, 34)), 0, 7, True),
        # one-token suffix of a group-1 member
        ChunkWork(2, (5,), 0, (12,), 1, 1, True),
        # a request with no group: 3 new tokens after 6 own ones (pages 13, 14, 15; 35 and 36
        # held for later)
        ChunkWork(3, (1, 2, 3), 6, (13, 14, 15, 35, 36), None, 0, True),
    )
    plan = StepPlan(0, chunks, prefixes)
    batch = build_step_batch(plan, PAGE, BucketTable())
    # Pages held for tokens to come are left out of the own tables (they would be gathered).
    for table in (batch.metadata.row_page_table, batch.metadata.blk_page_table):
        assert not np.isin(table, [34, 35, 36]).any()
    assert batch.metadata.blk_token.shape[1] == own_q
    # The one-token row reads its one page, not the width of the 70-token chunk's table.
    assert batch.metadata.row_page_table.shape[1] == BucketTable().pages_bucket(1)
    assert batch.metadata.blk_page_table.shape[1] == BucketTable().pages_bucket(18)
    large_real = int(np.sum(batch.metadata.lblk_prefix_len > 0))
    small_real = int(np.sum(batch.metadata.gblk_prefix_len > 0))
    if split.startswith("chosen"):
        assert (large_real, small_real) == (1, 2)
    t = batch.token_ids.shape[0]
    q = rng.normal(size=(t, HQ, D)).astype(np.float32)
    k_new = rng.normal(size=(t, HKV, D)).astype(np.float32)
    v_new = rng.normal(size=(t, HKV, D)).astype(np.float32)

    md = jax.tree.map(jnp.asarray, batch.metadata)
    attn = xla.make_stacked_paged_attention(md)  # one layer's pools, stacked as [1, ...]
    out, (kp, vp) = jax.jit(attn)(0, q, k_new, v_new, (k_pages[None], v_pages[None]))
    out, kp, vp = np.asarray(out), np.asarray(kp)[0], np.asarray(vp)[0]

    def flat(pages, table, n):
        return pages[list(table)].reshape(-1, HKV, D)[:n]

    r = 0
    for c in chunks:
        pref = prefixes[c.prefix_group] if c.prefix_group is not None else None
        for i in range(c.num_tokens):
            own_n = c.own_start + i + 1
            keys = [flat(kp, c.page_table, own_n)]
            vals = [flat(vp, c.page_table, own_n)]
            if pref is not None:
                keys.insert(0, flat(kp, pref.page_table, pref.prefix_len))
                vals.insert(0, flat(vp, pref.page_table, pref.prefix_len))
            want = _naive(q[r], np.concatenate(keys), np.concatenate(vals))
            np.testing.assert_allclose(out[r], want, rtol=1e-5, atol=1e-5)
            # This step's keys landed in the sequence's own pages.
            np.testing.assert_array_equal(flat(kp, c.page_table, own_n)[-1], k_new[r])
            r += 1
    assert np.all(np.isfinite(out))


def test_prefix_blocks_fit_the_groups_query_counts():
    assert split_prefix_queries([4] * 16) == (4, [(0, 1)] * 16)  # degree-4 decode: no padding
    assert split_prefix_queries([16] * 4) == (16, [(0, 1)] * 4)  # degree 16: a block per group
    assert split_prefix_queries([512]) == (16, [(8, 0)])  # suffix prefill: 8 gathers, not 32
    # decode tokens of four groups beside a long suffix chunk of a fifth: the decode tokens
    # stay in small blocks instead of each padding a large one
    assert split_prefix_queries([16, 16, 16, 16, 448]) == (16, [(0, 1)] * 4 + [(7, 0)])
    assert split_prefix_queries([70]) == (16, [(1, 1)])  # 64 + 6: the 6 in a small block
    assert split_prefix_queries([60]) == (16, [(1, 0)])  # 4 small blocks cost more than 1 large
    # Padding blocks cost as much as real ones: 8 queries fit one block of 16 better than two
    # of 4, unless block counts are padded to multiples of 4 anyway.
    assert split_prefix_queries([8]) == (16, [(0, 1)])
    assert split_prefix_queries([8], lambda n: -(-n // 4) * 4) == (4, [(0, 2)])


def test_own_blocks_grow_for_long_chunks_only():
    assert own_block_queries([]) == 64  # decode only: no blocks, the usual shape
    assert own_block_queries([512]) == 128  # a long chunk gathers its table 4 times, not 8
    assert own_block_queries([64] * 8) == 64  # short suffix chunks: 128 would pad each by half
    assert own_block_queries([70]) == 128  # one block of 128 instead of two of 64
    assert own_block_queries([512] + [64] * 8) == 64  # 12 blocks of 128 cost more than 16 of 64
    # Bucket padding counts: a 576-token chunk is 9 blocks of 64, padded to 12, or 5 of 128,
    # padded to 6.
    assert own_block_queries([576]) == 64
    assert own_block_queries([576], BucketTable().blocks_bucket) == 128


def test_merge_is_safe_when_neither_side_saw_keys():
    o = jnp.ones((2, 3, 4))
    l = jnp.full((2, 3), xla.MASK_VALUE)
    merged = xla.merge_attention_states(o * 0, l, o * 0, l)
    assert np.all(np.isfinite(np.asarray(merged)))


def test_ragged_layout_keeps_groups_contiguous_and_matches_the_xla_path():
    """The ragged metadata the Pallas kernels read describes the same attention (checked with
    the kernels' plain-jnp references; the kernels are checked against those elsewhere)."""
    import pallas_kernels as pk

    rng = np.random.default_rng(3)
    k_pages = rng.normal(size=(40, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(40, PAGE, HKV, D)).astype(np.float32)
    prefixes = (PrefixRef(0, (1, 2), 7), PrefixRef(1, (3,), 1))
    chunks = (
        ChunkWork(0, (11,), 5, (4, 5), 0, 7, True, True),
        ChunkWork(2, (5,), 0, (12,), 1, 1, True),
        ChunkWork(3, (1, 2, 3), 6, (13, 14, 15), None, 0, True),
        ChunkWork(1, tuple(range(20)), 2, (6, 7, 8, 9, 10, 11), 0, 7, True),
    )
    batch = build_step_batch(StepPlan(0, chunks, prefixes), PAGE, BucketTable(), ragged=True)
    md = batch.metadata
    # Group 0's two chunks were moved next to each other: one span of 1 + 20 queries.
    assert md.group_q_start[0] == 0 and md.group_q_len[0] == 21
    assert md.group_q_start[1] == 21 and md.group_q_len[1] == 1
    t = batch.token_ids.shape[0]
    q = rng.normal(size=(t, HQ, D)).astype(np.float32)
    mdj = jax.tree.map(jnp.asarray, md)
    want = xla.shared_prefix_paged_attention(q, k_pages, v_pages, mdj)
    own = pk.ragged_paged_attention_reference(
        q, k_pages, v_pages, mdj.seq_page_tables, mdj.seq_kv_lens, mdj.seq_q_start,
        mdj.seq_q_len)
    pre = pk.shared_prefix_attention_reference(
        q, k_pages, v_pages, mdj.group_page_tables, mdj.group_prefix_lens, mdj.group_q_start,
        mdj.group_q_len)
    got, _ = pk.merge_attention_states_reference(*own, *pre)
    n = batch.num_tokens
    np.testing.assert_allclose(np.asarray(got)[:n], np.asarray(want)[:n], rtol=1e-5, atol=1e-5)
