"""Decode attention over a shared prefix: the BatchLLM formulation against per-request attention.

A decode step of `groups * degree` requests; each group shares a `prefix_len`-token prefix and
each request has `suffix_len` keys of its own. Timed in one run, so ratios compare like with like:

* cpu: the XLA path (jnp references, jitted): shared-prefix attention per group (one matrix
  product) + own-pages attention + merge, against per-request attention where each request
  gathers its whole prefix+suffix context and does matrix-vector attention.
* gpu: the compiled Pallas kernels (prefix + own + merge; Mosaic GPU for 16-bit dtypes, with
  several key splits, and Triton) against per-request paged attention (the ragged kernel over
  each request's full page table) and `jax.nn.dot_product_attention` over contiguous
  per-request KV; achieved bandwidth is printed against the device's HBM peak (the
  simulator's profile of an H200, H100 or A100, by the device's name).

With `--cascade_root=R`, the groups' prefixes all begin with the same R tokens (one system
prompt over the documents) and the step is timed two ways with the cascade kernels
(`pallas_kernels.cascade_attention`): at depth 2 (the root once for every query, then each
group's own part) and at depth 1 (each group's whole prefix, the root read once per group),
with the share of the HBM peak each reaches. On a CPU this runs the kernels in interpret mode
(a check of the script, not a measurement).

    python -m experiments.bench_attention --device=cpu
    python -m experiments.bench_attention --device=gpu --dtype=bfloat16 --groups=16
    python -m experiments.bench_attention --device=gpu --dtype=bfloat16 --groups=16 \
        --prefix_len=1280 --cascade_root=512
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from batchjax.bench.roofline import median_seconds
from batchjax.sim.hardware import DEVICES, profile_for
from pallas_kernels import (
    cascade_attention,
    merge_attention_states,
    merge_attention_states_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    shared_prefix_attention,
    shared_prefix_attention_reference,
)
from pallas_kernels.paged_attention_mgpu import paged_attention_mgpu
from pallas_kernels.paged_metadata import block_work

DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Which comparison to run.")
PREFIX_LEN = flags.DEFINE_integer("prefix_len", 2048, "Shared prefix tokens per group.")
GROUPS = flags.DEFINE_integer("groups", 4, "Prefix groups in the step.")
DEGREE = flags.DEFINE_integer("degree", 16, "Requests per group (sharing degree).")
SUFFIX_LEN = flags.DEFINE_integer("suffix_len", 32, "Own keys per request, decode token included.")
PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "KV and query dtype.")
ITERS = flags.DEFINE_integer("iters", 10, "Timed repetitions (median reported).")
ROOT = flags.DEFINE_integer("cascade_root", 0, "Tokens every group's prefix shares (0: none); "
                            "then depth 2 against depth 1 of the cascade kernels is timed.")



def hbm_peak() -> tuple[float, str]:
    """(HBM bytes/s, its name) of the device the benchmark runs on, from the simulator's
    profiles (`batchjax.sim.hardware.DEVICES`); an H200's where the name matches none."""
    name = profile_for(jax.devices()[0].device_kind) or "h200"
    return DEVICES[name].hbm_bytes_per_s, name


def decode_step(rng: np.random.Generator):
    """One decode token per request. Returns q, pools, and three page-table layouts."""
    groups, degree, page = GROUPS.value, DEGREE.value, PAGE_SIZE.value
    requests = groups * degree
    prefix_pages = -(-PREFIX_LEN.value // page)
    own_pages = -(-SUFFIX_LEN.value // page)
    num_pages = groups * prefix_pages + requests * own_pages
    dtype = jnp.dtype(DTYPE.value)
    shape = (num_pages, page, KV_HEADS.value, HEAD_DIM.value)
    k_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    q = jnp.asarray(rng.standard_normal((requests, Q_HEADS.value, HEAD_DIM.value)), jnp.float32)
    q = q.astype(dtype)
    ids = rng.permutation(num_pages).astype(np.int32)
    group_tables = ids[: groups * prefix_pages].reshape(groups, prefix_pages)
    if ROOT.value:  # every group's prefix begins with the same pages: the shared root
        assert ROOT.value % page == 0 and ROOT.value < PREFIX_LEN.value, \
            "--cascade_root must be a multiple of --page_size, below --prefix_len"
        group_tables[:, : ROOT.value // page] = group_tables[0, : ROOT.value // page]
    own_tables = ids[groups * prefix_pages :].reshape(requests, own_pages)
    member_of = np.repeat(np.arange(groups), degree)
    full_tables = np.concatenate([group_tables[member_of], own_tables], axis=1)
    ones = np.ones(requests, np.int32)
    arange = np.arange(requests, dtype=np.int32)
    prefix = (jnp.asarray(group_tables), jnp.full(groups, PREFIX_LEN.value, jnp.int32),
              jnp.arange(groups, dtype=jnp.int32) * degree, jnp.full(groups, degree, jnp.int32))
    own = (jnp.asarray(own_tables), jnp.full(requests, SUFFIX_LEN.value, jnp.int32),
           jnp.asarray(arange), jnp.asarray(ones))
    # The full context only works page-aligned: the prefix must fill its last page.
    assert PREFIX_LEN.value % page == 0, "--prefix_len must be a multiple of --page_size"
    full = (jnp.asarray(full_tables), jnp.full(requests, PREFIX_LEN.value + SUFFIX_LEN.value,
                                                jnp.int32), jnp.asarray(arange), jnp.asarray(ones))
    return q, k_pages, v_pages, prefix, own, full


def kv_bytes(num_keys: int) -> int:
    return 2 * num_keys * KV_HEADS.value * HEAD_DIM.value * jnp.dtype(DTYPE.value).itemsize


def run_cpu(q, k_pages, v_pages, prefix, own, full) -> None:
    @jax.jit
    def shared(q, k_pages, v_pages):
        on_prefix = shared_prefix_attention_reference(
            q, k_pages, v_pages, *prefix, max_group_q_len=DEGREE.value
        )
        on_own = ragged_paged_attention_reference(q, k_pages, v_pages, *own)
        return merge_attention_states_reference(*on_prefix, *on_own)

    @jax.jit
    def per_request(q, k_pages, v_pages):
        return ragged_paged_attention_reference(q, k_pages, v_pages, *full)

    got, want = shared(q, k_pages, v_pages), per_request(q, k_pages, v_pages)
    error = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
    t_shared = median_seconds(lambda: shared(q, k_pages, v_pages), ITERS.value)
    t_naive = median_seconds(lambda: per_request(q, k_pages, v_pages), ITERS.value)
    print(f"device={jax.devices()[0].device_kind} requests={q.shape[0]} groups={GROUPS.value} "
          f"degree={DEGREE.value} prefix={PREFIX_LEN.value} suffix={SUFFIX_LEN.value} "
          f"Hq={Q_HEADS.value} Hkv={KV_HEADS.value} D={HEAD_DIM.value} dtype={DTYPE.value}")
    print(f"max |shared - per_request| = {error:.2e}")
    print(f"xla shared-prefix (prefix + own + merge): {t_shared * 1e3:.2f} ms")
    print(f"xla per-request full context:             {t_naive * 1e3:.2f} ms")
    print(f"speedup: {t_naive / t_shared:.2f}x")


def gpu_seconds(fn, repeats: int, calls: int = 20) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back launches (one sync each):
    host dispatch overlaps device work, so short kernels are not timed as launch latency."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def run_gpu(q, k_pages, v_pages, prefix, own, full) -> None:
    requests = q.shape[0]
    peak, peak_name = hbm_peak()

    # The shared-prefix path is a prefix part, an own part and a merge; every variant timed
    # below (whole or a part alone) is built from these.
    def prefix_part(backend, splits=None):
        if backend == "mosaic_gpu":
            return lambda q, k, v: paged_attention_mgpu(q, k, v, *prefix, causal=False,
                                                        block_q=DEGREE.value, kv_splits=splits)
        return lambda q, k, v: shared_prefix_attention(q, k, v, *prefix, backend=backend,
                                                       block_q=DEGREE.value)

    def own_part(backend):
        return lambda q, k, v: ragged_paged_attention(q, k, v, *own, backend=backend)

    def shared_path(on_prefix, on_own, merge=merge_attention_states):
        return jax.jit(lambda q, k, v: merge(*on_prefix(q, k, v), *on_own(q, k, v)))

    def per_request_with(backend):
        return jax.jit(lambda q, k, v: ragged_paged_attention(q, k, v, *full, backend=backend))

    # Contiguous per-request KV, built once outside the timing: the dense library baseline.
    context = PREFIX_LEN.value + SUFFIX_LEN.value
    k_dense = k_pages[full[0]].reshape(requests, context, KV_HEADS.value, HEAD_DIM.value)
    v_dense = v_pages[full[0]].reshape(requests, context, KV_HEADS.value, HEAD_DIM.value)

    @jax.jit
    def dense(q, k_dense, v_dense):
        return jax.nn.dot_product_attention(q[:, None], k_dense, v_dense)[:, 0]

    shared_keys = GROUPS.value * PREFIX_LEN.value + requests * SUFFIX_LEN.value
    full_keys = requests * context
    sixteen_bit = jnp.dtype(DTYPE.value).itemsize == 2
    rows = []
    if sixteen_bit:
        rows += [(f"mosaic shared-prefix, kv_splits={n}",
                  shared_path(prefix_part("mosaic_gpu", n), own_part("mosaic_gpu")), shared_keys)
                 for n in (None, 1, 4, 8)]
        rows += [("mosaic per-request paged", per_request_with("mosaic_gpu"), full_keys)]
    rows += [
        ("triton shared-prefix", shared_path(prefix_part("triton"), own_part("triton")),
         shared_keys),
        ("triton per-request paged", per_request_with("triton"), full_keys),
    ]
    def alone(name, fn, keys):
        """A part of the shared-prefix path on its own: (name, fn(q, k, v), keys it reads)."""
        return (name, jax.jit(fn), keys)

    prefix_keys, own_keys = GROUPS.value * PREFIX_LEN.value, requests * SUFFIX_LEN.value
    on_own = own_part("triton")(q, k_pages, v_pages)
    on_prefix = prefix_part("triton")(q, k_pages, v_pages)
    parts = [
        alone("  part: prefix, triton", prefix_part("triton"), prefix_keys),
        alone("  part: own, triton", own_part("triton"), own_keys),
        alone("  part: merge, pallas block_t=8", lambda q, k, v: merge_attention_states(
            *on_prefix, *on_own, block_t=8), 0),
        alone("  part: merge, pallas block_t=1", lambda q, k, v: merge_attention_states(
            *on_prefix, *on_own, block_t=1), 0),
        alone("  part: merge, jnp", lambda q, k, v: merge_attention_states_reference(
            *on_prefix, *on_own), 0),
        alone("  part: page-table work lists", lambda q, k, v: block_work(
            requests // DEGREE.value, DEGREE.value, k.shape[0], *prefix), 0),
    ]
    if sixteen_bit:
        parts += [alone(f"  part: prefix, mosaic kv_splits={n}", prefix_part("mosaic_gpu", n),
                        prefix_keys) for n in (1, 8, 16)]
        parts += [alone("  part: own, mosaic", own_part("mosaic_gpu"), own_keys)]
        rows += [("mosaic shared-prefix, splits 8, jnp merge",
                  shared_path(prefix_part("mosaic_gpu", 8), own_part("mosaic_gpu"),
                              merge_attention_states_reference), shared_keys)]
    want = per_request_with("triton")(q, k_pages, v_pages)
    print(f"device={jax.devices()[0].device_kind} requests={requests} groups={GROUPS.value} "
          f"degree={DEGREE.value} prefix={PREFIX_LEN.value} suffix={SUFFIX_LEN.value} "
          f"Hq={Q_HEADS.value} Hkv={KV_HEADS.value} D={HEAD_DIM.value} dtype={DTYPE.value} "
          f"jax={jax.__version__}")
    print("bandwidth = the KV bytes the variant must read at least once / time "
          "(per-request variants count every request's whole context)")
    times = {}
    for name, fn, keys in rows:
        got = fn(q, k_pages, v_pages)
        error = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
        seconds = gpu_seconds(lambda: fn(q, k_pages, v_pages), ITERS.value)
        times[name] = seconds
        bandwidth = kv_bytes(keys) / seconds
        print(f"{name:38s} {seconds * 1e6:9.1f} us  {bandwidth / 1e12:5.2f} TB/s "
              f"({100 * bandwidth / peak:5.1f}% of {peak_name}'s HBM)  max|diff|={error:.1e}")
    for name, fn, keys in parts:
        seconds = gpu_seconds(lambda: fn(q, k_pages, v_pages), ITERS.value)
        bandwidth = kv_bytes(keys) / seconds
        print(f"{name:38s} {seconds * 1e6:9.1f} us  {bandwidth / 1e12:5.2f} TB/s")
    seconds = gpu_seconds(lambda: dense(q, k_dense, v_dense), ITERS.value)
    times["jax.nn.dot_product_attention"] = seconds
    bandwidth = kv_bytes(full_keys) / seconds
    print(f"{'jax.nn.dot_product_attention':38s} {seconds * 1e6:9.1f} us  "
          f"{bandwidth / 1e12:5.2f} TB/s ({100 * bandwidth / peak:5.1f}% of {peak_name}'s HBM)")
    best = min((t, n) for n, t in times.items() if "shared" in n)
    print(f"fastest shared-prefix variant: {best[1]}")
    for name, seconds in times.items():
        if "shared" not in name:
            print(f"speedup over {name}: {seconds / best[0]:.2f}x")


def cascade_levels(prefix, requests: int):
    """The step's shared context as two levels: the root once over every query, then each
    group's part after it. Returns the cascade's (page tables, lens, q starts, q lens)."""
    tables, lens, q_start, q_len = (np.asarray(a) for a in prefix)
    groups, width = tables.shape
    root_pages = ROOT.value // PAGE_SIZE.value
    level_tables = np.zeros((2, groups, width), np.int32)
    level_tables[0, 0, :root_pages] = tables[0, :root_pages]
    level_tables[1, :, : width - root_pages] = tables[:, root_pages:]
    level_lens = np.stack([np.where(np.arange(groups) == 0, ROOT.value, 0), lens - ROOT.value])
    level_q_start = np.stack([np.zeros(groups), q_start])
    level_q_len = np.stack([np.where(np.arange(groups) == 0, requests, 0), q_len])
    return tuple(jnp.asarray(a, jnp.int32) for a in
                 (level_tables, level_lens, level_q_start, level_q_len))


def run_cascade(q, k_pages, v_pages, prefix, own, full) -> None:
    """Depth 2 against depth 1 of the cascade kernels on one decode step."""
    requests = q.shape[0]
    peak, peak_name = hbm_peak()
    interpret = DEVICE.value == "cpu"
    one_level = tuple(a[None] for a in prefix)
    two_levels = cascade_levels(prefix, requests)

    def cascade(levels):
        def attend(q, k, v):
            mine = ragged_paged_attention(q, k, v, *own, interpret=interpret)
            return cascade_attention(q, k, v, mine, *levels, interpret=interpret,
                                     block_q=DEGREE.value)
        return jax.jit(attend)

    variants = {"depth 2 (root once, then each group's part)":
            (cascade(two_levels), ROOT.value + GROUPS.value * (PREFIX_LEN.value - ROOT.value)),
            "depth 1 (each group's whole prefix)":
            (cascade(one_level), GROUPS.value * PREFIX_LEN.value)}
    own_keys = requests * SUFFIX_LEN.value
    # Both against the oracle: each request's whole context, gathered.
    want = ragged_paged_attention_reference(q, k_pages, v_pages, *full)[0].astype(jnp.float32)
    error = max(float(jnp.max(jnp.abs(fn(q, k_pages, v_pages)[0].astype(jnp.float32) - want)))
                for fn, _ in variants.values())
    print(f"device={jax.devices()[0].device_kind} requests={requests} groups={GROUPS.value} "
          f"degree={DEGREE.value} prefix={PREFIX_LEN.value} (root {ROOT.value}) "
          f"suffix={SUFFIX_LEN.value} Hq={Q_HEADS.value} Hkv={KV_HEADS.value} D={HEAD_DIM.value} "
          f"dtype={DTYPE.value} jax={jax.__version__}; max |cascade - per-request oracle| = "
          f"{error:.1e}")
    timer = median_seconds if interpret else gpu_seconds
    times = {}
    for name, (fn, prefix_keys) in variants.items():
        seconds = timer(lambda: fn(q, k_pages, v_pages), ITERS.value)
        times[name] = seconds
        bandwidth = kv_bytes(prefix_keys + own_keys) / seconds
        print(f"{name:45s} {seconds * 1e6:10.1f} us  KV read {bandwidth / 1e12:5.2f} TB/s "
              f"({100 * bandwidth / peak:5.1f}% of {peak_name}'s HBM)")
    first, second = times.values()
    print(f"depth 1 over depth 2: {second / first:.2f}x")


def main(argv: list[str]) -> None:
    del argv
    step = decode_step(np.random.default_rng(0))
    if ROOT.value:
        run_cascade(*step)
    else:
        (run_cpu if DEVICE.value == "cpu" else run_gpu)(*step)


if __name__ == "__main__":
    app.run(main)
