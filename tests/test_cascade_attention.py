"""Cascade attention over generated trees of shared segments, depth 1 to 4: every path (the
XLA path, the native CPU kernel, the Pallas kernels in the interpreter) equals the plain-jnp
oracle, and the oracle equals a per-query softmax over the whole context."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.reference import has_keys
from batchjax.attention import pallas as pallas_attention
from batchjax.attention import xla
from batchjax.engine.step_batch import _group_contiguous, build_step_batch
from batchjax.kernels import native as native_kernels
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.step_plan import ChunkWork, PrefixRef, StepPlan

native_only = pytest.mark.skipif(not native_kernels.cpu_has_avx2_fma(),
                                 reason="the native kernels need x86-64 AVX2 and FMA")

PAGE = 4
HQ, HKV, D = 4, 2, 16
NUM_PAGES = 160


@dataclasses.dataclass
class Case:
    plan: StepPlan
    levels: int
    k_pages: np.ndarray
    v_pages: np.ndarray
    q: np.ndarray  # [T, Hq, D] in the layout's row order


def generated_step(depth: int, seed: int) -> Case:
    """A step over a random tree of segments `depth` levels deep: sequences below segments of
    every level (and some below none), chunks of 1 to 9 tokens over 0 to 12 earlier own keys,
    and a segment being computed below its parent."""
    rng = np.random.default_rng(seed)
    next_page = iter(range(1, NUM_PAGES))

    def pages(n: int) -> tuple[int, ...]:
        return tuple(next(next_page) for _ in range(-(-n // PAGE)))

    refs: dict[int, PrefixRef] = {}
    chains: list[tuple[int, ...]] = [()]

    def grow(chain: tuple[int, ...], level: int) -> None:
        for _ in range(int(rng.integers(1, 3))):
            seg = len(refs)
            n = int(rng.integers(1, 10))
            refs[seg] = PrefixRef(seg, pages(n), n, level)
            below = chain + (seg,)
            chains.append(below)
            if level + 1 < depth:
                grow(below, level + 1)

    grow((), 0)
    chunks = []
    for sid in range(int(rng.integers(6, 12))):
        chain = chains[int(rng.integers(0, len(chains)))]
        if sid == 0:  # the deepest chain is always there, so the tree reaches `depth`
            chain = max(chains, key=len)
        q_len = int(rng.integers(1, 10))
        kv = q_len + int(rng.integers(0, 13))
        context = sum(refs[s].prefix_len for s in chain)
        chunks.append(ChunkWork(sid, tuple(range(q_len)), kv - q_len, pages(kv),
                                chain[-1] if chain else None, context, True,
                                prefix_chain=chain))
    # A segment's own chunk: it attends its ancestors, causally over its own keys.
    deep = max(chains, key=len)
    if len(deep) > 1:
        seg = refs[deep[-1]]
        parent = deep[:-1]
        chunks.append(ChunkWork(-(seg.group_id + 1), tuple(range(seg.prefix_len)), 0,
                                seg.page_table, parent[-1],
                                sum(refs[s].prefix_len for s in parent), False,
                                prefix_chain=parent))
    order = rng.permutation(len(chunks))
    used = {s for c in chunks for s in c.prefix_chain}
    plan = StepPlan(0, tuple(chunks[i] for i in order), tuple(refs[s] for s in sorted(used)))
    k_pages = rng.normal(size=(NUM_PAGES, PAGE, HKV, D)).astype(np.float32)
    v_pages = rng.normal(size=(NUM_PAGES, PAGE, HKV, D)).astype(np.float32)
    t = BucketTable(table_pages=8, prefix_levels=depth).shape(plan.num_tokens, 0).tokens
    q = rng.normal(size=(t, HQ, D)).astype(np.float32)
    return Case(plan, depth, k_pages, v_pages, q)


def metadata(case: Case):
    table = BucketTable(table_pages=8, prefix_levels=case.levels)
    batch = build_step_batch(case.plan, PAGE, table)
    return jax.tree.map(jnp.asarray, batch.metadata), batch


def per_query_softmax(case: Case) -> np.ndarray:
    """Each real row against the keys of its chain's segments, then its own causal keys."""
    refs = {p.group_id: p for p in case.plan.prefixes}
    rep = HQ // HKV

    def flat(pages, table, n):
        return pages[list(table)].reshape(-1, HKV, D)[:n]

    out = np.zeros_like(case.q)
    r = 0
    for c in _group_contiguous(case.plan.chunks):
        for i in range(c.num_tokens):
            keys, vals = [], []
            for s in c.prefix_chain:
                keys.append(flat(case.k_pages, refs[s].page_table, refs[s].prefix_len))
                vals.append(flat(case.v_pages, refs[s].page_table, refs[s].prefix_len))
            keys.append(flat(case.k_pages, c.page_table, c.own_start + i + 1))
            vals.append(flat(case.v_pages, c.page_table, c.own_start + i + 1))
            k = np.repeat(np.concatenate(keys), rep, axis=1)
            v = np.repeat(np.concatenate(vals), rep, axis=1)
            s = np.einsum("hd,khd->hk", case.q[r], k) / np.sqrt(D)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[r] = np.einsum("hk,khd->hd", p / p.sum(-1, keepdims=True), v)
            r += 1
    return out


def reference(case: Case, md) -> tuple[np.ndarray, np.ndarray]:
    out, lse = pk.cascade_attention_reference(
        jnp.asarray(case.q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages),
        md.seq_page_tables, md.seq_kv_lens, md.seq_q_start, md.seq_q_len,
        md.group_page_tables, md.group_prefix_lens, md.group_q_start, md.group_q_len)
    return np.asarray(out), np.asarray(lse)


DEPTHS = [1, 2, 3, 4]
SEEDS = [0, 1]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_oracle_is_a_softmax_over_the_whole_context(depth, seed):
    case = generated_step(depth, seed)
    md, batch = metadata(case)
    assert md.prefix_levels == depth
    # The layout puts every segment's subtree on one span of rows, at every level.
    assert int(np.asarray(md.group_q_len[depth - 1]).sum()) > 0
    out, lse = reference(case, md)
    n = batch.num_tokens
    np.testing.assert_allclose(out[:n], per_query_softmax(case)[:n], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(has_keys(jnp.asarray(lse[:n]))))
    assert not np.asarray(has_keys(jnp.asarray(lse[n:]))).any()  # padding rows


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=native_only)])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_xla_path_and_the_native_kernel_equal_the_oracle(depth, seed, native):
    case = generated_step(depth, seed)
    md, batch = metadata(case)
    pools = (jnp.asarray(case.k_pages)[None], jnp.asarray(case.v_pages)[None])

    def attend(q, k, v):
        return xla.shared_prefix_paged_attention(q, k, v, md, layer=0, native=native)

    # One ragged call for the own part and one per level, all in the kernel with `native`.
    jaxpr = str(jax.make_jaxpr(attend)(jnp.asarray(case.q), *pools))
    assert jaxpr.count("batchjax_ragged_paged_attention_f32") == (1 + depth if native else 0)
    got = np.asarray(jax.jit(attend)(jnp.asarray(case.q), *pools))
    want, _ = reference(case, md)
    n = batch.num_tokens
    np.testing.assert_allclose(got[:n], want[:n], rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("depth", DEPTHS)
def test_the_pallas_cascade_equals_the_oracle(depth):
    case = generated_step(depth, seed=depth)
    md, batch = metadata(case)
    q, kp, vp = jnp.asarray(case.q), jnp.asarray(case.k_pages), jnp.asarray(case.v_pages)
    got = np.asarray(pallas_attention.shared_prefix_paged_attention(q, kp, vp, md))
    want, want_lse = reference(case, md)
    n = batch.num_tokens
    np.testing.assert_allclose(got[:n], want[:n], rtol=2e-5, atol=2e-5)
    # The kernel's own lse too, from the own part through every level's merge.
    own = pk.ragged_paged_attention(q, kp, vp, md.seq_page_tables, md.seq_kv_lens,
                                    md.seq_q_start, md.seq_q_len, interpret=True)
    _, lse = pk.cascade_attention(q, kp, vp, own, md.group_page_tables, md.group_prefix_lens,
                                  md.group_q_start, md.group_q_len, interpret=True)
    np.testing.assert_allclose(np.asarray(lse)[:n], want_lse[:n], rtol=1e-5, atol=1e-4)


def _shapes_in(jaxpr) -> set[tuple[int, ...]]:
    """The shape of every value any equation of `jaxpr` (or of a jaxpr inside it) makes."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes |= _shapes_in(inner)
    return shapes


def test_the_pallas_path_reads_a_layer_of_the_stacked_pools_in_place():
    """The engine's pools are stacked `[L, N, ...]` and the layer is traced (a scan): the
    kernels read that layer's pages where they lie, never a copy of the layer's pool."""
    case = generated_step(depth=2, seed=3)
    md, batch = metadata(case)
    noise = np.random.default_rng(9).normal(size=case.k_pages.shape).astype(np.float32)
    # Layer 1 holds the case's keys; layers 0 and 2 hold others, which must not leak in.
    k_all = jnp.asarray(np.stack([noise, case.k_pages, -noise]))
    v_all = jnp.asarray(np.stack([-noise, case.v_pages, noise]))

    def attend(q, k, v, layer):
        return pallas_attention.shared_prefix_paged_attention(q, k, v, md, layer=layer)

    q = jnp.asarray(case.q)
    got = np.asarray(jax.jit(attend)(q, k_all, v_all, jnp.int32(1)))
    want, _ = reference(case, md)
    n = batch.num_tokens
    np.testing.assert_allclose(got[:n], want[:n], rtol=2e-5, atol=2e-5)
    jaxpr = jax.make_jaxpr(attend)(q, k_all, v_all, jnp.int32(1)).jaxpr
    one_layer = {case.k_pages.shape, (1, *case.k_pages.shape),
                 (NUM_PAGES, PAGE * HKV, D)}  # the kernels' row view of one layer's pool
    assert not one_layer & _shapes_in(jaxpr)


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [2, 4])
def test_the_cascade_compiles_and_matches_on_a_gpu(depth):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    case = generated_step(depth, seed=7)
    md, batch = metadata(case)
    md = jax.device_put(md)
    q, kp, vp = (jax.device_put(jnp.asarray(a)) for a in (case.q, case.k_pages, case.v_pages))
    got = np.asarray(jax.jit(pallas_attention.shared_prefix_paged_attention)(q, kp, vp, md))
    want, _ = reference(case, md)
    n = batch.num_tokens
    np.testing.assert_allclose(got[:n], want[:n], rtol=2e-3, atol=2e-3)
