"""Shared-prefix paged attention in plain jnp: the reference path and the CPU default."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from batchjax.attention.metadata import PagedAttentionMetadata
from batchjax.kernels import paged_attention as native_paged

# Finite, so fully masked rows give no NaN; exp(MASK_VALUE - anything real) underflows to 0.
MASK_VALUE = -1e30


def pages_as(pages: jax.Array, dtype) -> jax.Array:
    """Pages (or keys read from them) as `dtype`: a pool of 16-bit floats is stored as their
    bits (`batchjax.engine.page_pool.kv_storage_dtype`) and read back without conversion."""
    if pages.dtype == jnp.uint16 and jnp.dtype(dtype) != jnp.uint16:
        return jax.lax.bitcast_convert_type(pages, dtype)
    return pages


def _gather_pages(pages: jax.Array, page_table: jax.Array, layer, dtype) -> jax.Array:
    """`page_table: [N, P]` -> keys `[N, P * page_size, Hkv, D]` in index order, as `dtype`.

    With `layer`, `pages` is the stacked pool `[L, num_pages, ...]` and the gather reads that
    layer's pages directly: slicing the layer out first copies the whole layer's pool on CPU.
    """
    g = pages[page_table] if layer is None else pages[layer, page_table]  # [N, P, ps, Hkv, D]
    g = pages_as(g, dtype)
    n, p, ps, h, d = g.shape
    return g.reshape(n, p * ps, h, d)


def _write_slots(pool: jax.Array, layer, slot_page: jax.Array, slot_offset: jax.Array,
                 vals: jax.Array) -> jax.Array:
    """`pool[layer, page, offset] = vals` in place; a uint16 pool takes the values' bits."""
    if pool.dtype == jnp.uint16 and vals.dtype != jnp.uint16:
        vals = jax.lax.bitcast_convert_type(vals, jnp.uint16)
    return pool.at[layer, slot_page, slot_offset].set(vals.astype(pool.dtype))


# Up to this many query rows per (sequence, KV head), `attend` computes scores key-major.
_KEY_MAJOR_MAX_ROWS = 64


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Masked softmax attention with its log-sum-exp.

    q: [N, Q, Hq, D], k/v: [N, K, Hkv, D], mask: [N, Q, K] -> out [N, Q, Hq, D], lse [N, Q, Hq].
    Rows with no visible key get out 0 and lse MASK_VALUE. The products run with (N, Hkv) as
    leading batch dimensions and a KV head's query heads stacked as rows, the layout XLA's CPU
    batched matmul is fastest on (4x over contracting in the input layout).
    """
    n, nq, hq, d = q.shape
    hkv = k.shape[2]
    r = hq // hkv
    qg = q.reshape(n, nq, hkv, r, d).transpose(0, 2, 1, 3, 4).reshape(n, hkv, nq * r, d)
    kt = k.transpose(0, 2, 1, 3)  # [N, Hkv, K, D]
    vt = v.transpose(0, 2, 1, 3)
    batch = ((0, 1), (0, 1))
    nk = mask.shape[-1]
    rows_mask = jnp.broadcast_to(mask[:, None, :, None, :],
                                 (n, 1, nq, r, nk)).reshape(n, 1, nq * r, nk)
    if nq * r <= _KEY_MAJOR_MAX_ROWS:
        # Few query rows against many keys (prefix blocks, decode): scores key-major,
        # [N, Hkv, K, Q*r]; XLA's CPU batched dot runs K.q^T and p^T.v about 1.5x faster than
        # q.K^T and p.v at these shapes.
        key_axis = 2
        s = jax.lax.dot_general(kt, qg, (((3,), (3,)), batch), preferred_element_type=jnp.float32)
        visible = jnp.swapaxes(rows_mask, 2, 3)
    else:
        key_axis = 3
        s = jax.lax.dot_general(qg, kt, (((3,), (3,)), batch), preferred_element_type=jnp.float32)
        visible = rows_mask
    s = jnp.where(visible, s * (1.0 / jnp.sqrt(jnp.float32(d))), MASK_VALUE)
    m = jnp.max(s, axis=key_axis)  # [N, Hkv, Q*r]
    p = jnp.exp(s - jnp.expand_dims(m, key_axis))
    l = jnp.sum(p, axis=key_axis)
    o = jax.lax.dot_general(p.astype(v.dtype), vt, (((key_axis,), (2,)), batch),
                            preferred_element_type=jnp.float32)  # [N, Hkv, Q*r, D]
    o = o / l[..., None]
    lse = m + jnp.log(l)  # [N, Hkv, Q*r]
    o = o.reshape(n, hkv, nq, r, d).transpose(0, 2, 1, 3, 4).reshape(n, nq, hq, d)
    lse = lse.reshape(n, hkv, nq, r).transpose(0, 2, 1, 3).reshape(n, nq, hq)
    seen = jnp.any(mask, axis=-1)  # [N, Q]
    o = jnp.where(seen[:, :, None, None], o, 0.0)
    lse = jnp.where(seen[:, :, None], lse, MASK_VALUE)
    return o, lse


# Pages per loop iteration of `paged_single_query_attention`: enough work to hide the loop's
# overhead, few enough that an iteration's keys stay in cache between its two products
# (SmolLM2, 64 rows over 1,088 own keys: 616-638 ms a step with 4 pages, 674-754 with 8,
# 694 with 2, 1,024 with 16). Tables of up to `_PAGES_NO_LOOP` pages are read in one go: a
# loop of two iterations over 6 pages made a 16-row decode step 11% slower.
_PAGES_PER_STEP = 4
_PAGES_NO_LOOP = 8


# Rows per iteration of `paged_single_query_attention`'s loop over rows, so that the keys
# gathered for them stay in cache between the two products. SmolLM2, a step's attention:
# 256 decode rows over 6-page tables took about 350 ms all at once, 156 ms 16 rows at a time;
# whole steps of 256 rows over 16-page own contexts, 1,080-1,130 ms at once, 850 ms 32 at a
# time (and 128 rows over 35 pages 750-770 -> 690 ms). 64 rows at once or 32 at a time ran
# the same.
_ROWS_PER_CHUNK = 16  # tables of up to `_PAGES_NO_LOOP` pages, read in one go
_ROWS_PER_CHUNK_LOOP = 32  # longer tables, read in the loop over pages


def _in_chunks(fn, chunk: int, *arrays):
    """`fn(*arrays)` computed `chunk` leading rows at a time in a loop, outputs stacked back.

    Every array's leading dimension is cut the same way; `chunk` must divide it."""
    rows = arrays[0].shape[0]
    split = [a.reshape(rows // chunk, chunk, *a.shape[1:]) for a in arrays]
    outs = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda o: o.reshape(rows, *o.shape[2:]), outs)


def paged_single_query_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_len: jax.Array, layer=None, native: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One query per row against its first `kv_len` keys, read page by page in place.

    q: [R, Hq, D]; page_table: [R, P]; kv_len: [R] -> out [R, Hq, D], lse [R, Hq]. An online
    softmax over the page index: per-request decode reads a whole context for one query, so
    gathering it into a copy first (as blocks do) tripled its memory traffic (4x slower on CPU
    at 1,088-token contexts). Rows with kv_len 0 give out 0 and lse MASK_VALUE.
    """
    o, lse = paged_rows_attention(q[:, None], k_pages, v_pages, page_table, kv_len, layer,
                                  native)
    return o[:, 0], lse[:, 0]


def paged_rows_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_len: jax.Array, layer=None, native: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Rows of Q queries, each row's queries against all of its first `kv_len` keys, read
    page by page in place (see `paged_single_query_attention`, the Q = 1 case).

    q: [R, Q, Hq, D]; page_table: [R, P]; kv_len: [R] -> out [R, Q, Hq, D], lse [R, Q, Hq].
    The loop over pages stops at the longest row of each chunk of rows, so a table bucketed
    to more pages than its row's keys fill costs nothing past them. With `native`, operands
    the native CPU kernel takes go to it instead (`batchjax.kernels.paged_attention`, with
    this function as its reference).
    """
    if native and native_paged.supports(q, k_pages):
        return native_paged.paged_rows_attention(q, k_pages, v_pages, page_table, kv_len, layer)
    rows, nq, hq, d = q.shape
    page_size, hkv = k_pages.shape[-3], k_pages.shape[-2]
    most = _ROWS_PER_CHUNK if page_table.shape[1] <= _PAGES_NO_LOOP else _ROWS_PER_CHUNK_LOOP
    most = max(1, most // nq)
    if rows > most:
        chunk = next((c for c in (most, most // 2, most // 4) if c and rows % c == 0), rows)
        return _in_chunks(
            lambda q, t, n: paged_rows_attention(q, k_pages, v_pages, t, n, layer),
            chunk, q, page_table, kv_len)
    r = hq // hkv
    # A KV head's queries (Q tokens x r heads) side by side: [R, Hkv, Q * r, D].
    qg = q.reshape(rows, nq, hkv, r, d).transpose(0, 2, 1, 3, 4).reshape(rows, hkv, nq * r, d)
    qg = qg.astype(jnp.float32) * (1.0 / jnp.sqrt(jnp.float32(d)))
    per_step = page_table.shape[1] if page_table.shape[1] <= _PAGES_NO_LOOP else _PAGES_PER_STEP
    steps = -(-page_table.shape[1] // per_step)
    table = jnp.pad(page_table, ((0, 0), (0, steps * per_step - page_table.shape[1])))
    table = table.reshape(rows, steps, per_step)
    keys_per_step = per_step * page_size

    def page_step(carry, j):
        m, l, acc = carry
        k = _gather_pages(k_pages, table[:, j], layer, q.dtype)  # [R, keys_per_step, Hkv, D]
        v = _gather_pages(v_pages, table[:, j], layer, q.dtype)
        s = jnp.einsum("nhrd,nkhd->nhrk", qg, k, preferred_element_type=jnp.float32)
        visible = (j * keys_per_step + jnp.arange(keys_per_step))[None, :] < kv_len[:, None]
        s = jnp.where(visible[:, None, None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * scale + jnp.sum(p, axis=-1)
        acc = acc * scale[..., None] + jnp.einsum(
            "nhrk,nkhd->nhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (m_new, l, acc), None

    init = (jnp.full((rows, hkv, nq * r), MASK_VALUE, jnp.float32),
            jnp.zeros((rows, hkv, nq * r), jnp.float32),
            jnp.zeros((rows, hkv, nq * r, d), jnp.float32))
    if steps == 1:  # short contexts: no loop at all
        (m, l, acc), _ = page_step(init, 0)
    else:
        # Only as many iterations as the longest row needs: the table's bucket padding (38
        # pages read as 48) costs nothing.
        needed = jnp.minimum((jnp.max(kv_len) + keys_per_step - 1) // keys_per_step, steps)

        def body(carry):
            j, state = carry
            return j + 1, page_step(state, j)[0]

        _, (m, l, acc) = jax.lax.while_loop(lambda c: c[0] < needed, body,
                                            (jnp.zeros((), needed.dtype), init))
    seen = (kv_len > 0)[:, None, None]
    o = jnp.where(seen[..., None], acc / l[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(l), MASK_VALUE)
    o = o.reshape(rows, hkv, nq, r, d).transpose(0, 2, 1, 3, 4).reshape(rows, nq, hq, d)
    lse = lse.reshape(rows, hkv, nq, r).transpose(0, 2, 1, 3).reshape(rows, nq, hq)
    return o, lse


def merge_attention_states(parts) -> jax.Array:
    """The softmax over the union of every part's keys, from each part's `(out [T, H, D],
    lse [T, H])`: o = sum_i e^l_i o_i / sum_i e^l_i, stably."""
    m = parts[0][1]
    for _, lse in parts[1:]:
        m = jnp.maximum(m, lse)
    num, den = 0.0, 0.0
    for o, lse in parts:
        w = jnp.exp(lse - m)[..., None]
        num, den = num + w * o, den + w
    return num / den


def _scatter_rows(shape, rows: jax.Array, vals: jax.Array, fill) -> jax.Array:
    """Place `vals: [M, ...]` at token rows `[M]` of a fresh `[T, ...]`; row T is dropped."""
    return jnp.full(shape, fill, vals.dtype).at[rows].set(vals, mode="drop")


def _slot_page_offset(slot_mapping: jax.Array, page_size: int):
    """Flat KV slots -> (page, offset within the page)."""
    return slot_mapping // page_size, slot_mapping % page_size


def _step_keys(pages: jax.Array, layer, slot_mapping: jax.Array, dtype) -> jax.Array:
    """This step's own keys `[T, Hkv, D]`, read back from the slots they were written to."""
    page, offset = _slot_page_offset(slot_mapping, pages.shape[-3])
    return pages_as(pages[page, offset] if layer is None else pages[layer, page, offset], dtype)


# Groups of query tiles in `chunk_window_attention`, each with its own window width. On the
# 16-request no-sharing run (576-token prompts, 512-token steps): 21.4 s with 2 groups, 20.6
# with 4, 20.1 with 8 (one per tile there, within noise of 4).
_WINDOW_GROUPS = 4


def chunk_window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, tok_chunk: jax.Array, win_key_row: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of each multi-token chunk's queries to the chunk's keys of this step.

    q: [T, Hq, D], k/v: [T, Hkv, D] (this step's), tok_chunk: [T] (the chunk of each row; -1
    for decode rows and padding), win_key_row: [Tt, W] (the rows query tile i of T/Tt rows
    reads; T = none) -> out [T, Hq, D], lse [T, Hq]. Chunks are contiguous rows, so row order
    is position order and a key is visible to a query of its chunk at or after it. The keys
    come straight from the step, not from the pages: no gather of pages, and a tile reads only
    the window of rows its chunks can reach (about the chunk length), where a block of the
    chunk used to read the chunk's whole page table. Tiles near the step's start cannot reach
    back further than it: the tiles are taken in `_WINDOW_GROUPS` groups, each reading only
    as much of the window as its last tile can reach.
    """
    t, hq, d = q.shape
    tiles, width = win_key_row.shape
    u = t // tiles
    chunk_pad = jnp.concatenate([tok_chunk, jnp.full((1,), -1, tok_chunk.dtype)])
    k_pad = jnp.concatenate([k, jnp.zeros((1,) + k.shape[1:], k.dtype)])
    v_pad = jnp.concatenate([v, jnp.zeros((1,) + v.shape[1:], v.dtype)])
    q_rows = jnp.arange(t, dtype=win_key_row.dtype).reshape(tiles, u)
    q_chunk = tok_chunk.reshape(tiles, u)
    q_tiles = q.reshape(tiles, u, hq, d)
    # (first tile, last tile + 1, window columns): a tile ending at row e needs at most e keys.
    groups = min(tiles, _WINDOW_GROUPS)
    bounds = [g * tiles // groups for g in range(groups + 1)]
    spans = [(a, b, min(width, b * u)) for a, b in zip(bounds, bounds[1:])]
    outs, lses = [], []
    for a, b, w in spans:
        rows = win_key_row[a:b, width - w:]  # the window's last w rows, in row order
        k_chunk = chunk_pad[rows]
        mask = ((q_chunk[a:b, :, None] == k_chunk[:, None, :]) & (q_chunk[a:b, :, None] >= 0)
                & (rows[:, None, :] <= q_rows[a:b, :, None]))
        o, lse = attend(q_tiles[a:b], k_pad[rows], v_pad[rows], mask)
        outs.append(o)
        lses.append(lse)
    return (jnp.concatenate(outs).reshape(t, hq, d),
            jnp.concatenate(lses).reshape(t, hq))


# Blocks per iteration of `_block_attention`'s loop (SmolLM2, 16 groups x 16 rows over
# 1,024-token prefixes: 950-967 ms a step with 4, 1,020-1,032 ms all at once, about 1,070 ms
# one at a time, where the loop's per-iteration cost shows).
_BLOCKS_PER_CHUNK = 4

# Prefix blocks of at most this many queries read their group's prefix page by page in place
# (`paged_rows_attention`) instead of gathering the whole bucketed table: decode rows of small
# groups. SmolLM2 steps, timed alternately in one process: 16 groups x 4 decode rows over
# 1,024-token prefixes 404.5 -> 329.5 ms; 16-row steps of the industry-like mix (12 blocks of 4
# over prefixes of 200-833 tokens in 96-page tables) 321.1 -> 221.7 ms. Blocks of 16 queries
# over whole 1,024-token prefixes were 4-5% slower that way, so they keep the gather.
PAGED_PREFIX_MAX_QUERIES = 4
# With the native kernel, blocks of up to 16 queries read page by page (SmolLM2 over 30 layers,
# 16 blocks of 16 queries over a 1,024-token prefix: 259 ms gathered, 172 ms natively). Larger
# blocks keep the gather: at 64 and 128 queries the kernel was only 5% faster (367 -> 347 and
# 379 -> 358 ms for 8 x 64 and 4 x 128), within what the machine drifts between runs.
NATIVE_PAGED_PREFIX_MAX_QUERIES = 16


def _block_attention(q_pad, k_pages, v_pages, tok, page_table, kv_len, layer):
    """Blocks of queries, each against all of the first `kv_len` keys of its page table.

    q_pad: [T + 1, Hq, D] (row T pads); tok: [B, Q]; page_table: [B, P]; kv_len: [B] ->
    out [B, Q, Hq, D], lse [B, Q, Hq]. More than `_BLOCKS_PER_CHUNK` blocks run that many
    at a time in a loop, so that a chunk's gathered keys stay in cache between its two
    products.
    """
    t = q_pad.shape[0] - 1

    def one(tok, table, kv_len):
        k = _gather_pages(k_pages, table, layer, q_pad.dtype)
        v = _gather_pages(v_pages, table, layer, q_pad.dtype)
        mask = (jnp.arange(k.shape[1])[None, None, :] < kv_len[:, None, None]) & (
            tok[:, :, None] < t)
        return attend(q_pad[tok], k, v, mask)

    if tok.shape[0] > _BLOCKS_PER_CHUNK and tok.shape[0] % _BLOCKS_PER_CHUNK == 0:
        return _in_chunks(one, _BLOCKS_PER_CHUNK, tok, page_table, kv_len)
    return one(tok, page_table, kv_len)


def shared_prefix_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, md: PagedAttentionMetadata,
    layer=None, native: bool = False,
) -> jax.Array:
    """Own part (causal over own keys) + prefix part (dense over the group's prefix), merged.

    q: [T, Hq, D]; k_pages/v_pages: [N, page_size, Hkv, D] already holding this step's keys,
    or, with `layer` (may be traced), the stacked pools `[L, N, page_size, Hkv, D]`. With
    `native`, the parts read page by page run in the native CPU kernel where it applies.
    """
    t, hq, d = q.shape
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    native = native and native_paged.supports(q, k_pages)
    q_pad = jnp.concatenate([q, jnp.zeros((1, hq, d), q.dtype)])  # row T = padding query

    def scattered(rows, o, lse):  # per-query results -> the step's rows, others masked
        return (_scatter_rows((t, hq, d), rows, o.reshape(-1, hq, d), 0.0),
                _scatter_rows((t, hq), rows, lse.reshape(-1, hq), MASK_VALUE))

    # Own part, single-query rows: the whole own context, this step's key included.
    ro, rl = paged_single_query_attention(
        q_pad[md.row_token], k_pages, v_pages, md.row_page_table, md.row_kv_len, layer, native)
    parts = [scattered(md.row_token, ro, rl)]

    # Own part of multi-token chunks: this step's keys of the chunk (causal) ...
    if md.win_key_row.shape[0] > 0:
        k_step = _step_keys(k_pages, layer, md.slot_mapping, q.dtype)
        v_step = _step_keys(v_pages, layer, md.slot_mapping, q.dtype)
        parts.append(chunk_window_attention(q, k_step, v_step, md.tok_chunk, md.win_key_row))

    # Blocks of queries against all the first keys of a page table: the keys a chunk's
    # sequence held before this step (context blocks), and each block of a group's queries
    # (small and large blocks) against the group's whole shared prefix.
    # Small prefix blocks of few queries read their prefix page by page instead.
    small_paged = md.gblk_token.shape[1] <= (
        NATIVE_PAGED_PREFIX_MAX_QUERIES if native else PAGED_PREFIX_MAX_QUERIES)
    for tok, table, kv_len, paged in (
            (md.blk_token, md.blk_page_table, md.blk_ctx_len, False),
            (md.gblk_token, md.gblk_page_table, md.gblk_prefix_len, small_paged),
            (md.lblk_token, md.lblk_page_table, md.lblk_prefix_len, False)):
        if tok.shape[0] > 0:
            if paged:
                o, lse = paged_rows_attention(q_pad[tok], k_pages, v_pages, table, kv_len, layer,
                                              native)
            else:
                o, lse = _block_attention(q_pad, k_pages, v_pages, tok, table, kv_len, layer)
            parts.append(scattered(tok.reshape(-1), o, lse))
    return merge_attention_states(parts).astype(q.dtype)


def make_stacked_paged_attention(md: PagedAttentionMetadata, impl=shared_prefix_paged_attention):
    """An `AttentionFn` over all layers' pools `(k, v)`, each `[L, N, page_size, Hkv, D]`.

    `layer` may be traced (the model scans over layers): this layer's keys are scattered into
    its slice of the stacked pools in place, and `impl` reads that layer's pages from the
    stacked pools (its `layer` argument), never a copy of the layer's whole pool.
    """

    def attention(layer, q, k, v, kv):
        k_all, v_all = kv
        _, n, ps, h, d = k_all.shape
        page, offset = _slot_page_offset(md.slot_mapping, ps)
        k_all = _write_slots(k_all, layer, page, offset, k)
        v_all = _write_slots(v_all, layer, page, offset, v)
        return impl(q, k_all, v_all, md, layer=layer), (k_all, v_all)

    return attention
