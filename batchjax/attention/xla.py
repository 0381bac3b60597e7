"""Shared-prefix paged attention in plain jnp: the reference path, and the CPU default's
wrapper around the native kernel.

A step's attention has two parts, each ragged paged attention over fixed-size metadata
(`PagedAttentionMetadata`): the own part, every sequence's queries causally over its own
pages, and the prefix part, a cascade with one level per depth of shared segments, where
every segment's subtree of queries attends its pages without a mask. The parts merge by
log-sum-exp. With the native CPU kernel each part is one call that
reads every page once for up to 64 of a sequence's (or a group's) queries; without it, each
query token reads its keys page by page (`paged_rows_attention`).
"""

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
    kv_len: jax.Array, layer=None,
) -> tuple[jax.Array, jax.Array]:
    """One query per row against its first `kv_len` keys, read page by page in place.

    q: [R, Hq, D]; page_table: [R, P]; kv_len: [R] -> out [R, Hq, D], lse [R, Hq]. An online
    softmax over the page index: per-request decode reads a whole context for one query, so
    gathering it into a copy first (as blocks do) tripled its memory traffic (4x slower on CPU
    at 1,088-token contexts). Rows with kv_len 0 give out 0 and lse MASK_VALUE.
    """
    o, lse = paged_rows_attention(q[:, None], k_pages, v_pages, page_table, kv_len, layer)
    return o[:, 0], lse[:, 0]


def paged_rows_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_len: jax.Array, layer=None,
) -> tuple[jax.Array, jax.Array]:
    """Rows of Q queries, each row's queries against all of its first `kv_len` keys, read
    page by page in place (see `paged_single_query_attention`, the Q = 1 case).

    q: [R, Q, Hq, D]; page_table: [R, P]; kv_len: [R] -> out [R, Q, Hq, D], lse [R, Q, Hq].
    The loop over pages stops at the longest row of each chunk of rows, so a table bucketed
    to more pages than its row's keys fill costs nothing past them: chunks of padding rows
    (kv_len 0) run no iteration at all.
    """
    rows, nq, hq, d = q.shape
    page_size, hkv = k_pages.shape[-3], k_pages.shape[-2]
    most = _ROWS_PER_CHUNK if page_table.shape[1] <= _PAGES_NO_LOOP else _ROWS_PER_CHUNK_LOOP
    most = max(1, most // nq)
    chunk = next((c for c in (most, most // 2, most // 4) if c and rows % c == 0), None)
    if rows > most and chunk is not None:  # else all rows at once
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


def _slot_page_offset(slot_mapping: jax.Array, page_size: int):
    """Flat KV slots -> (page, offset within the page)."""
    return slot_mapping // page_size, slot_mapping % page_size


def _token_owner(num_tokens: int, q_start: jax.Array, q_len: jax.Array):
    """owner: [T] the sequence each row belongs to; local: [T] its index within it; owned: [T]."""
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    inside = (rows[:, None] >= q_start[None, :]) & (rows[:, None] < (q_start + q_len)[None, :])
    owner = jnp.argmax(inside, axis=1).astype(jnp.int32)
    return owner, rows - q_start[owner], jnp.any(inside, axis=1)


def ragged_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_len: jax.Array, q_start: jax.Array, q_len: jax.Array, *, causal: bool, layer=None,
    native: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Every sequence's query rows over the first `kv_len` keys of its page table.

    q: [T, Hq, D]; pools [N, page, Hkv, D] or, with `layer` (may be traced), the stacked
    `[L, N, ...]`; page_table: [S, P]; kv_len, q_start, q_len: [S] (q_len 0: padding) ->
    out [T, Hq, D] f32, lse [T, Hq] f32. Sequence s owns rows `q_start : q_start + q_len`.
    Causal: its query i sits at key `kv_len - q_len + i` and sees keys up to it (the own
    part); otherwise it sees all `kv_len` keys (a group over its shared prefix). Rows that no
    sequence owns give out 0 and lse MASK_VALUE. With `native`, operands the native CPU kernel
    takes go to it (`batchjax.kernels.paged_attention`, with this function as its reference).
    """
    if native and native_paged.supports(q, k_pages):
        return native_paged.ragged_paged_attention(
            q, k_pages, v_pages, page_table, kv_len, q_start, q_len, causal=causal, layer=layer)
    owner, local, owned = _token_owner(q.shape[0], q_start, q_len)
    seen = kv_len[owner] - q_len[owner] + local + 1 if causal else kv_len[owner]
    seen = jnp.where(owned, jnp.clip(seen, 0, kv_len[owner]), 0)  # [T] keys each row sees
    o, lse = paged_single_query_attention(q, k_pages, v_pages, page_table[owner], seen, layer)
    return o.astype(jnp.float32), lse


def shared_prefix_paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, md: PagedAttentionMetadata,
    layer=None, native: bool = False,
) -> jax.Array:
    """Own part (causal over own keys) + a cascade over the shared segments, merged.

    Each level of `md`'s prefix part is one ragged problem: every segment of that level with
    all the queries below it, dense over its keys. q: [T, Hq, D]; k_pages/v_pages:
    [N, page_size, Hkv, D] already holding this step's keys, or, with `layer` (may be
    traced), the stacked pools `[L, N, page_size, Hkv, D]`. With `native`, every part runs
    in the native CPU kernel where it applies.
    """
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    parts = [ragged_paged_attention(q, k_pages, v_pages, md.seq_page_tables, md.seq_kv_lens,
                                    md.seq_q_start, md.seq_q_len, causal=True, layer=layer,
                                    native=native)]
    for level in range(md.prefix_levels):
        tables, lens, q_start, q_len = md.level(level)
        parts.append(ragged_paged_attention(q, k_pages, v_pages, tables, lens, q_start, q_len,
                                            causal=False, layer=layer, native=native))
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
