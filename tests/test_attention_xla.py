"""The XLA shared-prefix paged attention equals plain attention over prefix + own tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchjax.attention import xla
from batchjax.attention.metadata import (
    CONTEXT_BLOCKS,
    PREFIX_LARGE_BLOCK,
    split_prefix_queries,
)
from batchjax.engine import step_batch
from batchjax.engine.step_batch import build_step_batch
from batchjax.schedule.buckets import BucketTable
from batchjax.kernels import native as native_kernels
from batchjax.schedule.step_plan import ChunkWork, PrefixRef, StepPlan

native_only = pytest.mark.skipif(not native_kernels.cpu_has_avx2_fma(),
                                 reason="the native kernels need x86-64 AVX2 and FMA")

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


def _check_against_full_context_attention(chunks, prefixes, rng, num_pages=60, native=False):
    """Runs the step's attention on random pages and checks every real token's output against
    plain attention over its prefix + own keys; returns the step's batch."""
    plan = StepPlan(0, chunks, prefixes)
    batch = build_step_batch(plan, PAGE, BucketTable())
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
    # With `native`, the rows really run in the kernel (not silently in XLA's loop).
    assert ("batchjax_paged_rows_attention_f32" in str(jax.make_jaxpr(attn)(*args))) == native
    out, (kp, vp) = jax.jit(attn)(*args)
    out, kp, vp = np.asarray(out), np.asarray(kp)[0], np.asarray(vp)[0]

    def flat(pages, table, n):
        return pages[list(table)].reshape(-1, HKV, D)[:n]

    prefix_of = {p.group_id: p for p in prefixes}
    r = 0
    for c in chunks:
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
@pytest.mark.parametrize("split", sorted(_SPLITS))
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_attention_matches_full_context_attention(seed, split, native,
                                                                monkeypatch):
    """Every way of cutting the prefix queries into blocks gives the same attention (group 0
    has 71 queries: one large block and the rest in a small one when chosen; group 1 has 41,
    one large block); with `native`, rows and small blocks run in the native CPU kernel."""
    monkeypatch.setattr(step_batch, "split_prefix_queries", _SPLITS[split])
    rng = np.random.default_rng(seed)
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
        # chunks that start their own keys: a 40-token suffix of a group-1 member and a
        # 5-token prompt with no group (page 48 held for later)
        ChunkWork(4, tuple(range(40)), 0, tuple(range(37, 47)), 1, 1, True),
        ChunkWork(5, (7, 8, 9, 10, 11), 0, (47, 48), None, 0, True),
    )
    batch = _check_against_full_context_attention(chunks, prefixes, rng, native=native)
    md = batch.metadata
    # Pages held for tokens to come are left out of the own tables (they would be gathered).
    for table in (md.row_page_table, md.blk_page_table):
        assert not np.isin(table, [34, 35, 36, 48]).any()
    # The one-token row reads its one page, not the width of the 70-token chunk's table.
    assert md.row_page_table.shape[1] == BucketTable().pages_bucket(1)
    # Context blocks read only the keys a chunk's sequence held before this step: 2 keys of
    # request 1 (one page), 6 of request 3 (two pages).
    assert md.blk_token.shape[1] == CONTEXT_BLOCKS[-1]  # its 70-token chunk needs the widest
    assert md.blk_page_table.shape[1] == BucketTable().context_pages_bucket(2)
    np.testing.assert_array_equal(md.blk_ctx_len, [2, 6])
    # Every multi-token chunk's new keys come from the step itself: 75 + 45 rows of chunks
    # (padded to 128, tiles of 64), the first chunk from row 1, so a 128-row window.
    np.testing.assert_array_equal(np.flatnonzero(md.tok_chunk >= 0),
                                  np.r_[np.arange(1, 71), np.arange(72, 75), np.arange(75, 120)])
    assert md.win_key_row.shape == (2, 128)
    large_real = int(np.sum(md.lblk_prefix_len > 0))
    small_real = int(np.sum(md.gblk_prefix_len > 0))
    if split.startswith("chosen"):
        assert (large_real, small_real) == (2, 1)


@pytest.mark.parametrize("lens", [(150, 3, 40), (64,) * 4, (2, 200, 1, 9), (300, 5, 150)])
def test_chunks_starting_their_keys_attend_within_windows_of_the_step(lens):
    """Prompt chunks laid out back to back (decode rows among them): each query sees exactly
    its chunk's earlier keys. The 150- and 200-token chunks need windows over more than half
    the step, so the tiles near the step's start read shorter windows than the last ones; in
    the 512-row step of (300, 5, 150) each group of tiles holds two tiles."""
    rng = np.random.default_rng(len(lens))
    chunks, page = [], 1
    for i, n in enumerate(lens):
        pages = -(-n // PAGE) if n > 1 else 2
        own_start = 0 if n > 1 else 5
        chunks.append(ChunkWork(i, tuple(range(n)), own_start, tuple(range(page, page + pages)),
                                None, 0, True, n == 1))
        page += pages
    batch = _check_against_full_context_attention(tuple(chunks), (), rng, num_pages=page + 1)
    md = batch.metadata
    t = batch.token_ids.shape[0]
    tiles, width = md.win_key_row.shape
    assert tiles == t // 64 and not md.blk_ctx_len.any()
    if max(lens) > 64:
        assert width > t // 2
    else:
        assert width == 64  # aligned 64-token chunks: each tile reads only its own rows


@pytest.mark.parametrize("lens,width,blocks", [((64, 40, 1), 64, 2), ((65, 40), 128, 2),
                                               ((300, 64), 128, 4)])
def test_context_blocks_take_the_narrowest_width_the_step_s_chunks_fit(lens, width, blocks):
    """Chunks continuing their sequences (after 20 earlier own keys each) read those keys in
    blocks of 64 queries when no such chunk is longer, else of 128 (300 tokens: 3 blocks)."""
    rng = np.random.default_rng(sum(lens))
    chunks, page = [], 1
    for i, n in enumerate(lens):
        pages = -(-(20 + n) // PAGE)
        chunks.append(ChunkWork(i, tuple(range(n)), 20, tuple(range(page, page + pages)),
                                None, 0, True, n == 1))
        page += pages
    batch = _check_against_full_context_attention(tuple(chunks), (), rng, num_pages=page + 1)
    md = batch.metadata
    assert md.blk_token.shape[1] == width
    assert int(np.sum(md.blk_ctx_len > 0)) == blocks


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


def test_merge_is_safe_when_neither_side_saw_keys():
    o = jnp.ones((2, 3, 4))
    l = jnp.full((2, 3), xla.MASK_VALUE)
    merged = xla.merge_attention_states([(o * 0, l), (o * 0, l)])
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


def test_single_query_rows_read_only_the_pages_their_longest_row_needs():
    """Rows over tables wider than one loop iteration (16 pages of 4 keys, read 4 pages at a
    time): the loop stops after the longest row's keys (37 keys: 3 of 4 iterations). Pages
    past that hold NaN, so reading them would show in the output."""
    rng = np.random.default_rng(7)
    k_pages = rng.normal(size=(40, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(40, PAGE, HKV, D)).astype(np.float32)
    table = np.arange(1, 33, dtype=np.int32).reshape(2, 16)
    kv_len = np.array([37, 5], np.int32)
    k_pages[table[:, 12:]] = np.nan
    v_pages[table[:, 12:]] = np.nan
    q = rng.normal(size=(2, HQ, D)).astype(np.float32)
    out, _ = jax.jit(xla.paged_single_query_attention)(q, k_pages, v_pages, table, kv_len)
    for i in range(2):
        keys = k_pages[table[i]].reshape(-1, HKV, D)[: kv_len[i]]
        vals = v_pages[table[i]].reshape(-1, HKV, D)[: kv_len[i]]
        np.testing.assert_allclose(np.asarray(out)[i], _naive(q[i], keys, vals),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,pages", [(48, 2), (24, 2), (96, 16), (40, 16)])
def test_many_rows_are_read_in_chunks_each_as_long_as_its_own_longest_row(rows, pages):
    """Steps with more rows than one loop iteration takes (16 over short tables, 32 over
    long ones; 24 and 40 rows run 8 at a time) give every row its own attention. Over long
    tables each chunk's loop stops at its own longest row: the rows after the first 32 hold at
    most 9 keys, and their later pages hold NaN."""
    rng = np.random.default_rng(rows)
    num_pages = rows * pages + 1
    k_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    table = np.arange(1, num_pages, dtype=np.int32).reshape(rows, pages)
    kv_len = rng.integers(1, pages * PAGE + 1, size=rows).astype(np.int32)
    if pages > 8:
        kv_len[32:] = rng.integers(1, 10, size=rows - 32)
        kv_len[0] = pages * PAGE  # the first chunk reads its whole table
        k_pages[table[32:, 4:]] = np.nan
        v_pages[table[32:, 4:]] = np.nan
    q = rng.normal(size=(rows, HQ, D)).astype(np.float32)
    out, lse = jax.jit(xla.paged_single_query_attention)(q, k_pages, v_pages, table, kv_len)
    assert out.shape == (rows, HQ, D) and lse.shape == (rows, HQ)
    for i in range(rows):
        keys = k_pages[table[i]].reshape(-1, HKV, D)[: kv_len[i]]
        vals = v_pages[table[i]].reshape(-1, HKV, D)[: kv_len[i]]
        np.testing.assert_allclose(np.asarray(out)[i], _naive(q[i], keys, vals),
                                   rtol=1e-5, atol=1e-5)


def test_many_groups_prefix_blocks_run_a_few_at_a_time():
    """Eight groups, each with a prefix and two decode rows: their prefix blocks run 4 at a
    time and every row still sees its own group's prefix."""
    prefixes = tuple(PrefixRef(g, (1 + 2 * g, 2 + 2 * g), 5 + g % 3) for g in range(8))
    chunks = tuple(ChunkWork(2 * g + i, (3,), 2, (20 + 2 * g + i,), g, 5 + g % 3, True, True)
                   for g in range(8) for i in range(2))
    batch = _check_against_full_context_attention(chunks, prefixes, np.random.default_rng(3))
    assert batch.metadata.gblk_token.shape[0] == 8


def test_rows_of_several_queries_read_only_the_pages_their_chunk_needs():
    """Small prefix blocks (4 queries of one group against its whole prefix) go through the
    page loop: 16 blocks over 16-page tables run 8 at a time, and each chunk's loop stops at
    its own longest prefix. The second chunk's prefixes hold at most 9 keys and their pages
    from the fifth on hold NaN, so reading them would show in the output."""
    rng = np.random.default_rng(11)
    rows, queries, pages = 16, 4, 16
    num_pages = rows * pages + 1
    k_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(num_pages, PAGE, HKV, D)).astype(np.float32)
    table = np.arange(1, num_pages, dtype=np.int32).reshape(rows, pages)
    kv_len = rng.integers(1, pages * PAGE + 1, size=rows).astype(np.int32)
    kv_len[8:] = rng.integers(1, 10, size=rows - 8)
    kv_len[3] = 0  # a padding block: no keys
    k_pages[table[8:, 4:]] = np.nan
    v_pages[table[8:, 4:]] = np.nan
    q = rng.normal(size=(rows, queries, HQ, D)).astype(np.float32)
    out, lse = jax.jit(xla.paged_rows_attention)(q, k_pages, v_pages, table, kv_len)
    assert out.shape == (rows, queries, HQ, D) and lse.shape == (rows, queries, HQ)
    for i in range(rows):
        keys = k_pages[table[i]].reshape(-1, HKV, D)[: kv_len[i]]
        vals = v_pages[table[i]].reshape(-1, HKV, D)[: kv_len[i]]
        for j in range(queries):
            want = _naive(q[i, j], keys, vals) if kv_len[i] else np.zeros((HQ, D))
            np.testing.assert_allclose(np.asarray(out)[i, j], want, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(lse[3] == xla.MASK_VALUE))
