"""Plain-jnp oracles for the attention kernels, and the XLA path of the engine.

Three functions, one contract (see DESIGN.md, "Attention in a step"):

* `ragged_paged_attention_reference`: every query token against its own sequence's pages,
  causal. Computed per token (a matrix-vector product each), which is what decode is.
* `shared_prefix_attention_reference`: every group's query tokens against the group's prefix
  pages, no mask. Computed per group as one dense `[queries x prefix]` matrix product.
* `merge_attention_states_reference`: the stable log-sum-exp merge of two partial results.
* `cascade_attention_reference`: every query token against its whole context at once, the
  chain of shared segments above it (one per level) and its own keys, in one softmax: what
  the cascade of the three above must equal.

Every function returns `lse` in float32, and a row that saw no key comes out with `out = 0` and
`lse = NO_KEYS_LSE`, a finite sentinel, so merging it is exact and NaN-free.
"""

import jax
import jax.numpy as jnp

# Finite "minus infinity": exp(NO_KEYS_LSE - x) underflows to 0 for any real lse x, and
# NO_KEYS_LSE - NO_KEYS_LSE is 0, not NaN, so fully masked rows stay finite everywhere.
NO_KEYS_LSE = -1e30


def has_keys(lse: jax.Array) -> jax.Array:
    """True where a row saw at least one key (any real lse is far above the sentinel)."""
    return lse > NO_KEYS_LSE / 2


def _token_owner(
    num_tokens: int, starts: jax.Array, lens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """owner: [T] index of the sequence (or group) that owns each row; owned: [T] bool."""
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    # [T, S]: row t belongs to s iff starts[s] <= t < starts[s] + lens[s]; ranges are disjoint.
    inside = (rows[:, None] >= starts[None, :]) & (rows[:, None] < (starts + lens)[None, :])
    return jnp.argmax(inside, axis=1).astype(jnp.int32), jnp.any(inside, axis=1)


def _gather_keys(pages: jax.Array, page_tables: jax.Array) -> jax.Array:
    """pages: [N, page, Hkv, D], page_tables: [..., P] -> [..., P * page, Hkv, D]."""
    num_pages, page_size, kv_heads, head_dim = pages.shape
    tables = jnp.clip(page_tables, 0, num_pages - 1)
    gathered = pages[tables]  # [..., P, page, Hkv, D]
    return gathered.reshape(*tables.shape[:-1], tables.shape[-1] * page_size, kv_heads, head_dim)


def _softmax_with_lse(
    scores: jax.Array, mask: jax.Array, values: jax.Array, equation: str
) -> tuple[jax.Array, jax.Array]:
    """Masked softmax over the last axis of `scores`, contracted with `values` by `equation`.

    scores, mask: [..., K] (float32 / bool); returns (out, lse) with the no-keys convention.
    """
    scores = jnp.where(mask, scores, NO_KEYS_LSE)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    seen = denom > 0
    out = jnp.einsum(equation, probs / jnp.where(seen, denom, 1.0), values.astype(jnp.float32))
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), NO_KEYS_LSE)
    return out, lse[..., 0]


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    seq_page_tables: jax.Array,
    seq_kv_lens: jax.Array,
    seq_q_start: jax.Array,
    seq_q_len: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of each query token over its own sequence's paged keys.

    q: [T, Hq, D]; k_pages, v_pages: [N, page, Hkv, D]; seq_page_tables: [S, P];
    seq_kv_lens, seq_q_start, seq_q_len: [S]. Query i of sequence s sits at key index
    `seq_kv_lens[s] - seq_q_len[s] + i` and sees keys up to and including it.
    Returns out: [T, Hq, D] (q.dtype) and lse: [T, Hq] float32.
    """
    keys, values, mask = _own_context(k_pages, v_pages, seq_page_tables, seq_kv_lens,
                                      seq_q_start, seq_q_len, q.shape[0])
    return _per_token_softmax(q, keys, values, mask)


def _own_context(k_pages, v_pages, seq_page_tables, seq_kv_lens, seq_q_start, seq_q_len,
                 num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's own sequence's keys and values [T, L, Hkv, D] and its causal mask [T, L]:
    query i of sequence s sits at key `seq_kv_lens[s] - seq_q_len[s] + i`."""
    owner, owned = _token_owner(num_tokens, seq_q_start, seq_q_len)
    keys = _gather_keys(k_pages, seq_page_tables[owner])
    values = _gather_keys(v_pages, seq_page_tables[owner])
    kv_len = seq_kv_lens[owner]
    query_pos = kv_len - seq_q_len[owner] + (jnp.arange(num_tokens) - seq_q_start[owner])
    key_pos = jnp.arange(keys.shape[1])
    mask = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < kv_len[:, None])
    return keys, values, mask & owned[:, None]


def _per_token_softmax(q, keys, values, mask) -> tuple[jax.Array, jax.Array]:
    """q: [T, Hq, D] against its row's keys/values [T, K, Hkv, D] where mask [T, K]: one
    softmax per token. Returns out [T, Hq, D] (q.dtype) and lse [T, Hq] float32."""
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    q_grouped = q.reshape(num_tokens, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("tkgd,tlkd->tkgl", q_grouped.astype(jnp.float32),
                        keys.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    out, lse = _softmax_with_lse(scores, mask[:, None, None, :], values, "tkgl,tlkd->tkgd")
    return (
        out.reshape(num_tokens, q_heads, head_dim).astype(q.dtype),
        lse.reshape(num_tokens, q_heads),
    )


def shared_prefix_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    group_page_tables: jax.Array,
    group_prefix_lens: jax.Array,
    group_q_start: jax.Array,
    group_q_len: jax.Array,
    *,
    max_group_q_len: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Unmasked attention of each group's query tokens over the group's shared prefix pages.

    q: [T, Hq, D]; k_pages, v_pages: [N, page, Hkv, D]; group_page_tables: [G, Pg];
    group_prefix_lens, group_q_start, group_q_len: [G]. Each group is one dense
    `[max_group_q_len * Hq/Hkv, prefix]` matrix product per KV head. `max_group_q_len` is a
    static bound on `group_q_len` (default T, always safe); rows beyond it are not computed.
    Returns out: [T, Hq, D] (q.dtype) and lse: [T, Hq] float32.
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    group = q_heads // kv_heads
    rows_per_group = num_tokens if max_group_q_len is None else max_group_q_len
    local = jnp.arange(rows_per_group, dtype=jnp.int32)
    rows = group_q_start[:, None] + local[None, :]  # [G, Q]
    row_valid = local[None, :] < group_q_len[:, None]
    q_groups = q[jnp.clip(rows, 0, num_tokens - 1)]  # [G, Q, Hq, D]
    q_groups = q_groups.reshape(*rows.shape, kv_heads, group, head_dim).astype(jnp.float32)
    keys = _gather_keys(k_pages, group_page_tables)  # [G, L, Hkv, D]
    values = _gather_keys(v_pages, group_page_tables)
    scores = jnp.einsum("gqkhd,glkd->gqkhl", q_groups, keys.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    key_valid = jnp.arange(keys.shape[1])[None, :] < group_prefix_lens[:, None]  # [G, L]
    mask = (row_valid[:, :, None] & key_valid[:, None, :])[:, :, None, None, :]
    out, lse = _softmax_with_lse(scores, mask, values, "gqkhl,glkd->gqkhd")
    # Scatter the group rows back to the flat token layout; unowned rows keep the no-keys state.
    target = jnp.where(row_valid, rows, num_tokens).reshape(-1)
    flat_out = jnp.zeros((num_tokens, q_heads, head_dim), jnp.float32)
    flat_out = flat_out.at[target].set(out.reshape(-1, q_heads, head_dim), mode="drop")
    flat_lse = jnp.full((num_tokens, q_heads), NO_KEYS_LSE, jnp.float32)
    flat_lse = flat_lse.at[target].set(lse.reshape(-1, q_heads), mode="drop")
    return flat_out.astype(q.dtype), flat_lse


def merge_attention_states_reference(
    out1: jax.Array, lse1: jax.Array, out2: jax.Array, lse2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """o = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2), stably; out*: [T, Hq, D], lse*: [T, Hq]."""
    lse1 = lse1.astype(jnp.float32)
    lse2 = lse2.astype(jnp.float32)
    top = jnp.maximum(lse1, lse2)
    # A side that saw no keys weighs exactly 0, whatever its `out` holds.
    w1 = jnp.where(has_keys(lse1), jnp.exp(lse1 - top), 0.0)
    w2 = jnp.where(has_keys(lse2), jnp.exp(lse2 - top), 0.0)
    denom = w1 + w2  # 0 only when neither side saw a key, else >= 1
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out = w1[..., None] * out1.astype(jnp.float32) + w2[..., None] * out2.astype(jnp.float32)
    out = out / safe[..., None]
    return out.astype(out1.dtype), jnp.where(seen, top + jnp.log(safe), NO_KEYS_LSE)


def cascade_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    seq_page_tables: jax.Array,
    seq_kv_lens: jax.Array,
    seq_q_start: jax.Array,
    seq_q_len: jax.Array,
    level_page_tables: jax.Array,
    level_lens: jax.Array,
    level_q_start: jax.Array,
    level_q_len: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One softmax per query token over its whole context: the keys of the segment that owns
    its row at each level (no mask), then its own sequence's keys (causal, as in
    `ragged_paged_attention_reference`). Nothing is merged: the keys are concatenated.

    q: [T, Hq, D]; pools [N, page, Hkv, D]; seq_*: [S, P] / [S]; level_page_tables:
    [L, G, Pg]; level_lens, level_q_start, level_q_len: [L, G].
    Returns out: [T, Hq, D] (q.dtype) and lse: [T, Hq] float32.
    """
    num_tokens = q.shape[0]
    keys, values, masks = [], [], []
    for level in range(level_q_len.shape[0]):
        owner, owned = _token_owner(num_tokens, level_q_start[level], level_q_len[level])
        table = level_page_tables[level][owner]  # [T, Pg]
        k = _gather_keys(k_pages, table)
        keys.append(k)
        values.append(_gather_keys(v_pages, table))
        length = jnp.where(owned, level_lens[level][owner], 0)
        masks.append(jnp.arange(k.shape[1])[None, :] < length[:, None])
    own = _own_context(k_pages, v_pages, seq_page_tables, seq_kv_lens, seq_q_start, seq_q_len,
                       num_tokens)
    for part, new in zip((keys, values, masks), own):
        part.append(new)
    return _per_token_softmax(q, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1),
                              jnp.concatenate(masks, axis=1))
