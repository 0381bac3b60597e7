"""The XLA shared-prefix paged attention equals plain attention over prefix + own tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchjax.attention import xla
from batchjax.attention.metadata import PREFIX_BLOCK_SIZES, prefix_block_size
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


@pytest.mark.parametrize("block_q", PREFIX_BLOCK_SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_attention_matches_full_context_attention(seed, block_q, monkeypatch):
    """Every prefix block size gives the same attention (group 0 has 21 queries: several
    blocks of 4 or 16, part of one of 64)."""
    monkeypatch.setattr(step_batch, "prefix_block_size", lambda queries, pad: block_q)
    rng = np.random.default_rng(seed)
    num_pages = 40
    k_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    # Group 0: prefix of 7 tokens on pages 1,2. Group 1: prefix of 1 token on page 3.
    prefixes = (PrefixRef(0, (1, 2), 7), PrefixRef(1, (3,), 1))
    chunks = (
        # decode token of a group-0 member with 5 own tokens already there (pages 4, 5)
        ChunkWork(0, (11,), 5, (4, 5), 0, 7, True, True),
        # a 20-token suffix chunk of a group-0 member, starting at own index 2 (pages 6..11)
        ChunkWork(1, tuple(range(20)), 2, (6, 7, 8, 9, 10, 11), 0, 7, True),
        # one-token suffix of a group-1 member
        ChunkWork(2, (5,), 0, (12,), 1, 1, True),
        # a request with no group: 3 new tokens after 6 own ones (pages 13, 14, 15)
        ChunkWork(3, (1, 2, 3), 6, (13, 14, 15), None, 0, True),
    )
    plan = StepPlan(0, chunks, prefixes)
    batch = build_step_batch(plan, PAGE, BucketTable())
    assert batch.metadata.gblk_token.shape[1] == block_q
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


def test_prefix_block_size_fits_the_groups_query_counts():
    assert prefix_block_size([4] * 16) == 4  # degree-4 decode: no padded queries
    assert prefix_block_size([16] * 4) == 16  # degree-16 decode: one block per group
    assert prefix_block_size([512]) == 64  # suffix prefill: the prefix gathered 8x, not 32x
    assert prefix_block_size([]) == max(PREFIX_BLOCK_SIZES)
    # Padding blocks cost as much as real ones: one group of 64 queries is one 64-query block,
    # unless the step's block count is padded to at least 2; then four 16-query blocks win.
    assert prefix_block_size([64]) == 64
    assert prefix_block_size([64], lambda n: max(n, 2)) == 16


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
