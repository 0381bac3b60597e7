"""The shared-prefix paged attention equals plain attention over prefix + own tokens, on the
XLA reference path and through the native CPU kernel, over fixed-size ragged metadata."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from batchjax.attention import xla
from batchjax.engine.step_batch import _group_contiguous, build_step_batch
from batchjax.kernels import native as native_kernels
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.step_plan import ChunkWork, PrefixRef, StepPlan

native_only = pytest.mark.skipif(not native_kernels.cpu_has_avx2_fma(),
                                 reason="the native kernels need x86-64 AVX2 and FMA")

PAGE = 4
HQ, HKV, D = 4, 2, 8
TABLE = BucketTable(table_pages=32)


def _naive(q, keys, vals):
    """q: [Hq, D] vs keys/vals [K, Hkv, D], no mask."""
    rep = HQ // HKV
    k = np.repeat(keys, rep, axis=1)
    v = np.repeat(vals, rep, axis=1)
    s = np.einsum("hd,khd->hk", q, k) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hk,khd->hd", p, v)


# Group 0: prefix of 7 tokens on pages 1,2. Group 1: prefix of 1 token on page 3.
PREFIXES = (PrefixRef(0, (1, 2), 7), PrefixRef(1, (3,), 1))
CHUNKS = (
    # decode token of a group-0 member with 5 own tokens already there (pages 4, 5; page 34
    # is held for tokens to come: no key of it is visible yet)
    ChunkWork(0, (11,), 5, (4, 5, 34), 0, 7, True, True),
    # one-token suffix of a group-1 member
    ChunkWork(2, (5,), 0, (12,), 1, 1, True),
    # a request with no group: 3 new tokens after 6 own ones (pages 13, 14, 15; 35 and 36 held
    # for later)
    ChunkWork(3, (1, 2, 3), 6, (13, 14, 15, 35, 36), None, 0, True),
    # a 70-token suffix chunk of a group-0 member, starting at own index 2 (pages 16..33): more
    # than one item of the native kernel's 64 queries
    ChunkWork(1, tuple(range(70)), 2, tuple(range(16, 34)), 0, 7, True),
    # chunks that start their own keys: a 40-token suffix of a group-1 member and a 5-token
    # prompt with no group
    ChunkWork(4, tuple(range(40)), 0, tuple(range(37, 47)), 1, 1, True),
    ChunkWork(5, (7, 8, 9, 10, 11), 0, (47, 48), None, 0, True),
)


def _check_against_full_context_attention(chunks, prefixes, rng, num_pages=60, native=False):
    """Runs the step's attention on random pages and checks every real token's output against
    plain attention over its prefix + own keys; returns the step's batch."""
    batch = build_step_batch(StepPlan(0, chunks, prefixes), PAGE, TABLE)
    k_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    t = batch.token_ids.shape[0]
    q = rng.normal(size=(t, HQ, D)).astype(np.float32)
    k_new = rng.normal(size=(t, HKV, D)).astype(np.float32)
    v_new = rng.normal(size=(t, HKV, D)).astype(np.float32)

    md = jax.tree.map(jnp.asarray, batch.metadata)
    impl = functools.partial(xla.shared_prefix_paged_attention, native=native)
    attn = xla.make_stacked_paged_attention(md, impl)  # one layer's pools, stacked as [1, ...]
    args = (0, q, k_new, v_new, (k_pages[None], v_pages[None]))
    # With `native`, both parts really run in the kernel (not silently in XLA's loop).
    jaxpr = str(jax.make_jaxpr(attn)(*args))
    assert jaxpr.count("batchjax_ragged_paged_attention_f32") == (2 if native else 0)
    out, (kp, vp) = jax.jit(attn)(*args)
    out, kp, vp = np.asarray(out), np.asarray(kp)[0], np.asarray(vp)[0]

    def flat(pages, table, n):
        return pages[list(table)].reshape(-1, HKV, D)[:n]

    prefix_of = {p.group_id: p for p in prefixes}
    r = 0
    for c in _group_contiguous(chunks):  # the layout's order
        pref = prefix_of[c.prefix_group] if c.prefix_group is not None else None
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
    return batch


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=native_only)])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_attention_matches_full_context_attention(seed, native):
    batch = _check_against_full_context_attention(CHUNKS, PREFIXES, np.random.default_rng(seed),
                                                  native=native)
    md = batch.metadata
    # Pages held for tokens to come are left out of the own tables.
    assert not np.isin(md.seq_page_tables, [34, 35, 36]).any()
    # Group 0's two chunks were moved next to each other: one span of 1 + 70 queries.
    assert md.prefix_levels == 1
    start, q_len, lens = md.group_q_start[0], md.group_q_len[0], md.group_prefix_lens[0]
    assert (start[0], q_len[0], lens[0]) == (0, 71, 7)
    assert (start[1], q_len[1], lens[1]) == (71, 41, 1)
    assert np.all(q_len[2:] == 0) and np.all(md.seq_q_len[len(CHUNKS):] == 0)


def test_a_step_s_shape_depends_on_its_token_count_alone():
    """Steps as unlike as a few decode rows over long contexts and one long prompt chunk take
    the same arrays when their tokens fall in one bucket (every per-row size is fixed)."""
    decode = StepPlan(0, tuple(ChunkWork(i, (3,), 40 + i, tuple(range(1 + 12 * i, 13 + 12 * i)),
                                         None, 0, True, True) for i in range(5)), ())
    prompt = StepPlan(0, (ChunkWork(0, tuple(range(9)), 0, (50, 51, 52), 0, 7, True),),
                      (PrefixRef(0, (1, 2), 7),))
    shapes = []
    for plan in (decode, prompt):
        batch = build_step_batch(plan, PAGE, TABLE)
        leaves = [batch.token_ids, batch.logits_index, *jax.tree.leaves(batch.metadata)]
        shapes.append((batch.shape, [a.shape for a in leaves]))
    assert shapes[0] == shapes[1]
    assert shapes[0][0].tokens == 16 and shapes[0][0].table_pages == 32


def test_a_table_wider_than_the_job_s_is_a_clear_error():
    plan = StepPlan(0, (ChunkWork(0, (3,), 200, tuple(range(1, 52)), None, 0, True, True),), ())
    with pytest.raises(ValueError, match="51 pages"):
        build_step_batch(plan, PAGE, TABLE)


def test_a_segment_wider_or_a_chain_deeper_than_the_step_s_is_a_clear_error():
    wide = StepPlan(0, (ChunkWork(0, (3,), 0, (60,), 0, 200, True),),
                    (PrefixRef(0, tuple(range(1, 51)), 200),))
    with pytest.raises(ValueError, match="segment 0 needs 50 pages"):
        build_step_batch(wide, PAGE, TABLE)
    deep = StepPlan(0, (ChunkWork(0, (3,), 0, (60,), 1, 8, True, prefix_chain=(0, 1)),),
                    (PrefixRef(0, (1,), 4), PrefixRef(1, (2,), 4, 1)))
    with pytest.raises(ValueError, match="sequence 0 attends 2 shared segments"):
        build_step_batch(deep, PAGE, TABLE)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=native_only)])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged_attention_matches_the_pallas_kernels_oracles(causal, native):
    """Random ragged metadata with padding sequences and rows no sequence owns, against the
    kernels' plain-jnp references (the XLA path and the native kernel share one contract)."""
    rng = np.random.default_rng(5 + causal)
    t, s, p = 96, 12, 16  # tables hold every sequence's keys (at most 49)
    lens = [1, 7, 1, 30, 1, 0, 2, 9]  # 0: a padding sequence in the middle
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    q_len = np.zeros(s, np.int32)
    q_start = np.full(s, t, np.int32)
    q_len[: len(lens)], q_start[: len(lens)] = lens, starts
    kv = np.zeros(s, np.int32)
    kv[: len(lens)] = [n + rng.integers(0 if causal else 1, 20) for n in lens]
    kv[5] = 0
    tables = rng.integers(1, 50, size=(s, p)).astype(np.int32)
    k_pages = rng.normal(size=(50, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(50, PAGE, HKV, D)).astype(np.float32)
    q = rng.normal(size=(t, HQ, D)).astype(np.float32)
    args = [jnp.asarray(a) for a in (q, k_pages, v_pages, tables, kv, q_start, q_len)]
    out, lse = jax.jit(functools.partial(xla.ragged_paged_attention, causal=causal,
                                         native=native))(*args)
    if causal:
        want_o, want_l = pk.ragged_paged_attention_reference(*args)
    else:
        want_o, want_l = pk.shared_prefix_attention_reference(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_o), rtol=1e-5, atol=1e-5)
    owned = np.zeros(t, bool)
    owned[: sum(lens)] = True
    np.testing.assert_allclose(np.asarray(lse)[owned], np.asarray(want_l)[owned], rtol=1e-5,
                               atol=1e-4)
    assert np.all(np.asarray(lse)[~owned] == xla.MASK_VALUE)
    assert np.all(np.asarray(out)[~owned] == 0)


def test_merge_is_safe_when_neither_side_saw_keys():
    o = jnp.ones((2, 3, 4))
    l = jnp.full((2, 3), xla.MASK_VALUE)
    merged = xla.merge_attention_states([(o * 0, l), (o * 0, l)])
    assert np.all(np.isfinite(np.asarray(merged)))


def test_rows_read_only_the_pages_their_longest_row_needs():
    """Rows over tables wider than one loop iteration stop at their longest row: keys past
    kv_len never reach the result, whatever the pages there hold."""
    rng = np.random.default_rng(0)
    rows, pages = 32, 16
    k = rng.normal(size=(60, PAGE, HKV, D)).astype(np.float32)
    v = rng.normal(size=(60, PAGE, HKV, D)).astype(np.float32)
    table = rng.integers(1, 59, size=(rows, pages)).astype(np.int32)
    kv_len = rng.integers(0, 20, size=rows).astype(np.int32)
    q = rng.normal(size=(rows, 1, HQ, D)).astype(np.float32)
    got = xla.paged_rows_attention(q, jnp.asarray(k), jnp.asarray(v), table, kv_len)
    poisoned = table.copy()
    for r in range(rows):  # pages past each row's keys point at a page of NaNs
        poisoned[r, -(-kv_len[r] // PAGE):] = 59
    k[59] = np.nan
    got_poisoned = xla.paged_rows_attention(q, jnp.asarray(k), jnp.asarray(v), poisoned, kv_len)
    np.testing.assert_allclose(np.asarray(got_poisoned[0]), np.asarray(got[0]), rtol=1e-6)
    assert np.all(np.asarray(got[0])[kv_len == 0] == 0)
