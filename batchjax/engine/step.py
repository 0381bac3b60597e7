"""The jitted model step: `(params, kv, StepBatch arrays) -> (sampled tokens, kv)`.

The decoder layers run under `lax.scan` over stacked per-layer parameters, so XLA compiles one
layer body per step shape instead of every layer unrolled (on CPU a 30-layer model otherwise
costs a minute of compilation per shape). The KV pools are stacked too, `[L, N, page, Hkv, D]`,
carried through the scan and donated, so pages are updated in place.

On x86-64 CPUs (`cpu_kernels="auto"`) two parts run through native kernels where they can
(`batchjax.kernels`): the dense products (fused q/k/v, o, fused gate/up, down, and the
vocabulary head), for which the step keeps those weights packed, all layers in one array, and
passes the layer index; and, on the `xla` attention path, the ragged paged attention.

Programs are compiled ahead of time, one per `StepShape` (`warm_up`), and called directly: a
call returns device arrays at once, so the host plans the next step while this one runs. The
next step reads this one's sampled tokens from its `feed` on the device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from batchjax.attention import xla
from batchjax.engine import sampling, transfer
from batchjax.engine.sampling import sampling_row_arrays
from batchjax.engine.step_batch import StepBatch, empty_step_batch
from batchjax.kernels import native, packed_matmul
from batchjax.models.llama import DecoderLayer
from batchjax.requests import MAX_LOGPROBS
from batchjax.sharding import rules
from batchjax.sharding.mesh import describe, make_mesh, replicated, spans_processes
from batchjax.sharding.tensor_parallel import Layout

_PACKABLE = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
             ("mlp", "down_proj"))
_COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")  # output columns cut over the `model` axis
_ROW_PARALLEL = ("o_proj", "down_proj")  # input rows cut: partial sums, all-reduced
CPU_KERNELS = ("auto", "native", "xla")


def _attention_impl(name: str):
    if name == "xla":
        return xla.shared_prefix_paged_attention
    if name == "pallas":
        from batchjax.attention import pallas  # imported lazily: only this path needs Pallas

        return pallas.shared_prefix_paged_attention
    raise ValueError(f"unknown attention implementation {name!r}; choose 'xla' or 'pallas'")


def choose_cpu_kernels(name: str, dtype) -> str:
    """'native' or 'xla' for requested `cpu_kernels` ('auto': native wherever it can run)."""
    if name not in CPU_KERNELS:
        raise ValueError(
            f"unknown cpu_kernels {name!r}; choose one of {', '.join(CPU_KERNELS)}")
    if name == "xla":
        return "xla"
    if jax.default_backend() != "cpu":
        reason = f"the native kernels are for CPUs, not {jax.default_backend()}"
    elif jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        reason = f"the native kernels are for float32 and bfloat16, not {jnp.dtype(dtype).name}"
    else:
        reason = native.unavailable_reason()
    if reason is None:
        return "native"
    if name == "native":
        raise ValueError(f"cpu_kernels='native' cannot run here: {reason}")
    return "xla"


def _stack_states(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _fused_layer_graphdef(config, dtype):
    """The graph of one fused decoder layer of `config` (shapes only, nothing allocated)."""
    def build():
        layer = DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(0))
        layer.fuse_projections()
        return layer

    return nnx.split(nnx.eval_shape(build))[0]


class ModelStep:
    """Runs one StepBatch through the model and samples the requested rows.

    The step runs on `mesh` (default: a mesh of one device), every device on its own heads
    and MLP columns (`batchjax.sharding`): one program under `shard_map`, whose partial
    products after the output and down projections are summed over the `model` axis. The
    embedding table and the LM head are placed as `sharding_rules` say (default:
    `rules.RULES`, the default placement), each with its collective: see
    `batchjax.sharding.rules`. A mesh of one runs the same program, its collectives over one
    device.
    """

    def __init__(self, model: nnx.Module, attention: str = "xla", cpu_kernels: str = "auto",
                 mesh: Mesh | None = None,
                 sharding_rules: dict[str, str | None] | None = None):
        config = model.config
        self.config = config
        self.rules = dict(rules.RULES if sharding_rules is None else sharding_rules)
        # (embedding table, LM head): which of their axes is on the `model` axis.
        self.placement = rules.placement(self.rules)
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.devices()[:1])
        if self.mesh.devices.shape[0] != 1:
            raise ValueError(f"a step runs on one replica's [1, T] mesh, got "
                             f"{describe(self.mesh)}")
        self.tensor_parallel = self.mesh.devices.shape[1]
        layout = self.layout = Layout.for_model(config, self.tensor_parallel)
        layers = []
        for layer in model.layers:
            # The step's own module tree (sharing the caller's arrays, not copying them) with
            # q/k/v and gate/up fused, one matmul each, their columns in the per-device order
            # of `layout`; the caller's model keeps the HF layout.
            layer = nnx.merge(*nnx.split(layer))
            layer.fuse_projections()
            qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
            qkv.kernel.set_value(qkv.kernel[...][:, layout.qkv_columns()])
            if qkv.bias is not None:
                qkv.bias.set_value(qkv.bias[...][layout.qkv_columns()])
            gate_up.kernel.set_value(gate_up.kernel[...][:, layout.gate_up_columns()])
            layers.append(layer)
        self._layer_graphdef = _fused_layer_graphdef(layout.local_config(), model.dtype)
        self._norm_graphdef, norm_state = nnx.split(model.norm)
        self.cpu_kernels = choose_cpu_kernels(cpu_kernels, model.dtype)
        layer_states = [nnx.split(layer)[1] for layer in layers]
        table = model.embed_tokens.embedding[...]  # [V, H]
        if model.lm_head is None:
            head = table.T  # tied: the lookup keeps [V, H] too
        else:
            head = model.lm_head.kernel[...]
        # Whichever axis is split is padded to split evenly (with zeros: see `_embed`, `_head`).
        table_placement, head_placement = self.placement
        if table_placement == "vocab":
            table = layout.pad_vocab(table, axis=0)
        elif table_placement == "embed":
            table = layout.pad_hidden(table, axis=1)
        head = layout.pad_vocab(head)  # whole packed panels, split or not
        if head_placement == "embed":
            head = layout.pad_hidden(head, axis=0)
        params = {"embed": {"embedding": table}, "norm": norm_state, "packed": {},
                  "head": head}
        if self.cpu_kernels == "native":
            self._pack(params, layer_states, model.dtype, self.tensor_parallel, head_placement)
        # Which native product the bf16 weights run on (None: XLA's dot, or f32 weights).
        self.bf16_matmul = None
        if self.cpu_kernels == "native" and jnp.dtype(model.dtype) == jnp.bfloat16:
            shapes = [w.shape[-1] for w in params["packed"].values()]
            if 2 * packed_matmul.PANEL not in shapes:
                self.bf16_matmul = "avx2_fma"
            else:
                self.bf16_matmul = "amx_bf16" if native.cpu_has_amx_bf16() else "avx512_bf16"
        params["layers"] = _stack_states(layer_states)
        self._param_specs = jax.tree_util.tree_map_with_path(
            lambda path, x: rules.param_spec(rules.tree_path_names(path), x.ndim, x.size,
                                             self.rules), params)
        # Whether every device of the mesh is this process's (not a `jax.distributed` job).
        self._local = not spans_processes(self.mesh)
        self.params = _place(params, jax.tree.map(
            lambda spec: NamedSharding(self.mesh, spec), self._param_specs), self._local)
        self.kv_sharding = NamedSharding(self.mesh, rules.kv_spec(self.rules))
        self._replicated = replicated(self.mesh)
        self.dtype = model.dtype
        self._inv_freq = np.asarray(config.rope_inv_freq(), np.float32)  # [D/2]
        impl = _attention_impl(attention)
        if attention == "xla" and self.cpu_kernels == "native":
            impl = functools.partial(impl, native=True)

        def local_forward(params, kv, feed, forward_inputs):
            # One device's part. An input still being sampled by the step before is a
            # placeholder: its real id is in that step's feed, read here without a round trip
            # through the host.
            token_ids, positions, logits_index, md, real_rows = forward_inputs
            from_feed = feed[jnp.clip(-token_ids - 1, 0, feed.shape[0] - 1)]
            token_ids = jnp.where(token_ids < 0, from_feed, token_ids)
            return self._forward(params, kv, token_ids, positions, logits_index, md, impl,
                                 real_rows)

        def sample(raw, feed, sampling_inputs, *, variant):
            # The tokens, the feed the next step reads them from, and what `variant` reports.
            sampling_rows, rows = sampling_inputs
            tokens, reported = _sample(raw, sampling_rows, rows, variant)
            return tokens, jnp.zeros_like(feed).at[: tokens.shape[0]].set(tokens), reported

        # Each program takes its host inputs as one buffer (`batchjax.engine.transfer`);
        # `layouts` say where they lie in it, the same for every step of a compiled shape.
        def local_step(params, kv, feed, packed, *, variant, layouts):
            forward_inputs, sampling_inputs = transfer.unpack(packed, layouts)
            raw, kv = local_forward(params, kv, feed, forward_inputs)
            tokens, feed, reported = sample(raw, feed, sampling_inputs, variant=variant)
            return tokens, feed, kv, reported

        def local_forward_only(params, kv, feed, packed, *, layouts):
            return local_forward(params, kv, feed, *transfer.unpack(packed, layouts))

        def sample_only(raw, feed, packed, *, variant, layouts):
            return sample(raw, feed, *transfer.unpack(packed, layouts), variant=variant)

        kv_spec = rules.kv_spec(self.rules)
        whole = PartitionSpec()

        def over_mesh(local, out_specs):
            # `local` run per device under shard_map: parameters and KV pools sharded, the
            # feed and every host input replicated.
            def run(params, kv, feed, *inputs):
                return jax.shard_map(
                    local, mesh=self.mesh, in_specs=(self._param_specs, (kv_spec, kv_spec), whole)
                    + (whole,) * len(inputs), out_specs=out_specs, check_vma=False,
                )(params, kv, feed, *inputs)
            return run

        def step(params, kv, feed, packed, *, variant, layouts):
            return over_mesh(functools.partial(local_step, variant=variant, layouts=layouts),
                             (whole, whole, (kv_spec, kv_spec), whole))(params, kv, feed, packed)

        def forward_only(params, kv, feed, packed, *, layouts):
            return over_mesh(functools.partial(local_forward_only, layouts=layouts),
                             (whole, (kv_spec, kv_spec)))(params, kv, feed, packed)

        self._jitted = jax.jit(step, donate_argnums=(1,), static_argnames=("variant", "layouts"))
        # A split step (`StepVariant.split`): the forward pass alone, then the sampler, so that
        # the host can compute the sampler's inputs (grammar masks) while the forward runs.
        self._jitted_forward = jax.jit(forward_only, donate_argnums=(1,),
                                       static_argnames=("layouts",))
        self._jitted_sample = jax.jit(sample_only, static_argnames=("variant", "layouts"))
        # (StepShape, StepVariant) -> its compiled `_Program`
        self._compiled: dict[tuple, Any] = {}

    @staticmethod
    def _pack(params, layer_states, dtype, tensor_parallel: int, head_placement: str) -> None:
        """Moves the dense kernels into `params["packed"]`, packed for the native matmul.

        Each layer's copy becomes an empty placeholder, so the scan slices nothing for it; a
        kernel whose width on one device is not a multiple of the panel stays where it is, on
        XLA's dot. Column-parallel kernels are cut over their panels, row-parallel ones over
        their rows (`batchjax.sharding.rules`); the LM head is either, as `head_placement`
        says ("vocab": columns, "embed": rows).
        """
        packed = params["packed"]
        preferred = packed_matmul.bf16_layout()  # AVX512-BF16 pairs where the CPU has them

        def pack(w, rows_per_device):
            layout = preferred if rows_per_device % 2 == 0 else "widen"
            return packed_matmul.pack(w, layout)

        for module, name in _PACKABLE:
            kernels = [st[module][name]["kernel"] for st in layer_states]
            k, n = kernels[0].shape
            column_parallel = name in _COLUMN_PARALLEL
            local_n = n // tensor_parallel if column_parallel else n
            local_k = k if column_parallel else k // tensor_parallel
            if local_n % packed_matmul.PANEL:
                continue
            packed[name] = pack(jnp.stack([w[...] for w in kernels]), local_k)
            for st in layer_states:
                st[module][name]["kernel"] = nnx.Param(jnp.zeros((0,), dtype))
        head = params["head"]
        k, n = head.shape
        if head_placement == "vocab":
            n //= tensor_parallel
        else:
            k //= tensor_parallel
        if n % packed_matmul.PANEL == 0:
            packed["lm_head"] = pack(head[None], k)
            del params["head"]

    def _embed(self, table, token_ids):
        """token_ids [T] -> x [T, hidden] (whole on every device) from this device's part of
        the embedding table, as `self.placement` puts it."""
        if self.placement[0] == "vocab":  # rows [d V/T, (d+1) V/T): the others' are zeros
            rows = table.shape[0]
            local = token_ids - jax.lax.axis_index("model") * rows
            mine = (local >= 0) & (local < rows)
            x = jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0)
            return jax.lax.psum(jnp.where(mine[:, None], x, jnp.zeros_like(x)), "model")
        x = jnp.take(table, token_ids, axis=0)
        if self.placement[0] == "embed":  # hidden columns [d H/T, (d+1) H/T), padded
            x = jax.lax.all_gather(x, "model", axis=1, tiled=True)[:, : self.config.hidden_size]
        return x

    def _head(self, params, x, num_sampled):
        """x [S, hidden] (whole on every device) -> logits [S, V] f32 (whole on every device)
        from this device's part of the LM head, as `self.placement` puts it."""
        if self.placement[1] == "embed":  # rows [d H/T, (d+1) H/T) of the padded head
            x = self.layout.pad_hidden(x, axis=1)
            local = x.shape[1] // self.tensor_parallel
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index("model") * local, local,
                                             axis=1)
        packed = params["packed"]
        if "lm_head" in packed:
            logits = packed_matmul.packed_matmul(x, packed["lm_head"], 0, num_sampled)
        else:
            logits = jnp.dot(x, params["head"])
        if self.placement[1] == "embed":  # partial sums over this device's hidden columns
            logits = jax.lax.psum(logits.astype(jnp.float32), "model")
        else:  # this device's slice of the (padded) vocabulary
            logits = jax.lax.all_gather(logits, "model", axis=1, tiled=True)
        return logits[:, : self.config.vocab_size].astype(jnp.float32)

    def _forward(self, params, kv, token_ids, positions, logits_index, md, impl, real_rows):
        """One device's part: token_ids, positions: [T]; logits_index: [S] -> logits [S, V]
        f32 (whole on every device), its kv heads.

        real_rows: (real tokens, real sampled rows), int32 scalars; the native products skip
        the padding rows after them (XLA's dot computes them and the step ignores them).
        """
        num_tokens, num_sampled = real_rows
        x = self._embed(params["embed"]["embedding"], token_ids)  # [T, hidden]
        angles = positions.astype(jnp.float32)[:, None] * self._inv_freq[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)  # [T, D]
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        attention = xla.make_stacked_paged_attention(md, impl)

        packed = params["packed"]  # closed over, not scanned: every layer's panels in one array

        def body(carry, layer_params):
            x, kv = carry
            layer_state, layer_idx = layer_params
            layer = nnx.merge(self._layer_graphdef, layer_state)

            def matmul(name, h):
                if name in packed:
                    y = packed_matmul.packed_matmul(h, packed[name], layer_idx, num_tokens)
                else:
                    module = layer.mlp if name in ("gate_up_proj", "down_proj") else layer.self_attn
                    y = jnp.dot(h, getattr(module, name).kernel[...])
                if name in _ROW_PARALLEL:  # partial sums of this device's heads or columns
                    y = jax.lax.psum(y, "model")
                return y

            x, kv = layer(x, cos, sin, layer_idx, attention, kv, matmul)
            return (x, kv), None

        num_layers = self.config.num_layers
        (x, kv), _ = jax.lax.scan(
            body, (x, kv), (params["layers"], jnp.arange(num_layers, dtype=jnp.int32)))
        x = x[logits_index]  # only sampled rows need the vocabulary-wide projection
        x = nnx.merge(self._norm_graphdef, params["norm"])(x)
        return self._head(params, x, num_sampled), kv

    @property
    def num_compiled_shapes(self) -> int:
        return len(self._compiled)

    @staticmethod
    def _forward_inputs(batch: StepBatch) -> tuple:
        """The forward pass's host arrays, in its program's order."""
        real_rows = (np.int32(batch.num_tokens), np.int32(batch.num_logits_rows))
        return (batch.token_ids, batch.positions, batch.logits_index, batch.metadata, real_rows)

    @classmethod
    def _host_inputs(cls, batch: StepBatch, sampling_rows, rows: dict[str, np.ndarray]) -> tuple:
        """A step's host arrays: (the forward pass's, the sampler's), in the programs' order."""
        return cls._forward_inputs(batch), (tuple(sampling_rows), rows)

    def _neutral_inputs(self, batch: StepBatch, variant: "StepVariant") -> tuple:
        return self._host_inputs(batch, sampling_row_arrays(batch.shape.sampled),
                                 variant.row_arrays(batch.shape.sampled, self.config.vocab_size))

    def _send(self, layouts, *trees) -> jax.Array:
        """`trees` packed into one buffer and sent to every device of the mesh: one transfer
        (`batchjax.engine.transfer`). They must lie as the program that reads them expects."""
        flat, got = transfer.pack(*trees)
        if got != layouts:
            raise ValueError("a step's inputs are not laid out as its compiled program reads "
                             "them (array shapes or dtypes differ from warm-up's)")
        return _place(flat, self._replicated, self._local)

    def _buffer(self, layouts) -> jax.ShapeDtypeStruct:
        """What a program's input buffer looks like, to compile it without sending one."""
        return jax.ShapeDtypeStruct((sum(l.size for l in layouts),), jnp.int32,
                                    sharding=self._replicated)

    def _program(self, kv, feed, batch: StepBatch, variant: "StepVariant", host=None):
        """The compiled program of `batch`'s shape; one warm-up did not foresee is compiled
        here (from `host` inputs, or neutral ones) and counted."""
        key = (batch.shape, variant)
        program = self._compiled.get(key)
        if program is None:
            host = self._neutral_inputs(batch, variant) if host is None else host
            program = self._compiled[key] = self._compile(kv, feed, host, variant)
        return program

    def _compile(self, kv, feed, host, variant: "StepVariant") -> "_Program":
        """The program of one shape: the whole step, or for a split variant both halves."""
        if not variant.split:
            _, layouts = transfer.pack(*host)
            return _Program(self._jitted.lower(self.params, kv, feed, self._buffer(layouts),
                                               variant=variant, layouts=layouts).compile(),
                            layouts)
        (_, forward_layouts), (_, sample_layouts) = (transfer.pack(tree) for tree in host)
        forward = self._jitted_forward.lower(self.params, kv, feed,
                                             self._buffer(forward_layouts),
                                             layouts=forward_layouts)
        logits = forward.out_info[0]
        raw = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=self._replicated)
        sample = self._jitted_sample.lower(raw, feed, self._buffer(sample_layouts),
                                           variant=variant, layouts=sample_layouts)
        return _Program(forward.compile(), forward_layouts, sample.compile(), sample_layouts)

    @staticmethod
    def fetch(tokens: jax.Array) -> np.ndarray:
        """A step's sampled tokens on the host. They are replicated over the mesh: this
        process's first copy is the whole array, even where other processes hold devices of
        the mesh (`jax.distributed`)."""
        return np.asarray(tokens.addressable_data(0))

    def empty_feed(self, size: int) -> jax.Array:
        """The feed before a job's first step: `size` is the most rows a step samples."""
        return _place(np.zeros(size, np.int32), self._replicated, self._local)

    def warm_up(self, kv, feed, shapes, variant: "StepVariant", progress: bool = True) -> int:
        """Compiles every shape of `shapes` not compiled yet, before any step runs; returns how
        many it compiled. Programs are traced one by one and built in parallel threads (XLA
        compiles outside the GIL); the persistent cache makes a rerun's builds loads."""
        todo = [s for s in dict.fromkeys(shapes) if (s, variant) not in self._compiled]
        if not todo:
            return 0
        bar = tqdm(total=len(todo), unit="shape", desc="compile", disable=not progress,
                   dynamic_ncols=True)
        threads = max(1, min(len(todo), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            futures = {}
            for shape in todo:
                host = self._neutral_inputs(empty_step_batch(shape), variant)
                futures[pool.submit(self._compile, kv, feed, host, variant)] = shape
            for future in concurrent.futures.as_completed(futures):
                self._compiled[(futures[future], variant)] = future.result()
                bar.update(1)
        bar.close()
        return len(todo)

    def __call__(self, kv, feed, batch: StepBatch, sampling_rows: tuple[np.ndarray, ...],
                 variant: "StepVariant", rows: dict[str, np.ndarray] | None = None):
        """Runs the step: returns (sampled tokens [Ss], feed, kv, reported) as device arrays,
        without waiting for them; `reported` is what `variant` adds per logits row
        (`StepVariant.row_arrays` names the row inputs `rows` holds). `feed` is the previous
        step's (or `empty_feed`)."""
        if rows is None:
            rows = variant.row_arrays(batch.shape.sampled, self.config.vocab_size)
        if variant.split:
            raw, kv = self.forward(kv, feed, batch, variant)
            tokens, feed, reported = self.sample(raw, feed, batch, sampling_rows, variant, rows)
            return tokens, feed, kv, reported
        host = self._host_inputs(batch, sampling_rows, rows)
        program = self._program(kv, feed, batch, variant, host)
        return program.run(self.params, kv, feed, self._send(program.layouts, *host))

    def forward(self, kv, feed, batch: StepBatch, variant: "StepVariant"):
        """The first half of a split step: returns (logits rows [S, V] f32, kv) as device
        arrays, without waiting. `sample` then draws from them with inputs the host may still
        have been computing while this ran."""
        if not variant.split:
            raise ValueError(f"{variant} is not a split variant")
        program = self._program(kv, feed, batch, variant)
        return program.run(self.params, kv, feed,
                           self._send(program.layouts, self._forward_inputs(batch)))

    def sample(self, raw, feed, batch: StepBatch, sampling_rows: tuple[np.ndarray, ...],
               variant: "StepVariant", rows: dict[str, np.ndarray]):
        """The second half of a split step: (sampled tokens [Ss], feed, reported)."""
        program = self._compiled[(batch.shape, variant)]
        return program.sample(raw, feed, self._send(program.sample_layouts,
                                                    (tuple(sampling_rows), rows)))


@dataclasses.dataclass(frozen=True)
class _Program:
    """A compiled step: one executable (`run`), or for a split variant the forward pass
    (`run`) and the sampler (`sample`); and how each one's host inputs lie in its buffer."""

    run: Any
    layouts: tuple
    sample: Any = None
    sample_layouts: tuple = ()


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """What a compiled step does with its logits rows besides sampling (one program per
    shape and variant; a job runs one variant).

    `greedy`: every row takes the argmax (no sort, no draw). `logprobs`: every row reports
    the logprob of a target token (the one it sampled, or, for a prompt-scoring row, the next
    prompt token), the `MAX_LOGPROBS` most likely tokens and the argmax, of the model's raw
    distribution (f32 log-softmax); with `processed`, rows flagged so report the distribution
    sampled from instead (after the grammar mask, temperature and filters). `constrained`:
    each row carries a packed token bitmask (`batchjax.engine.grammar`) applied before
    sampling.
    """

    greedy: bool = True
    logprobs: bool = False
    processed: bool = False
    constrained: bool = False

    @property
    def split(self) -> bool:
        """Whether the step runs as two programs, the forward pass and then the sampler
        (`ModelStep.forward`, `ModelStep.sample`): constrained steps are, so that their grammar
        masks, which need the previous step's tokens, are computed while the forward runs."""
        return self.constrained

    def row_arrays(self, num_rows: int, vocab_size: int) -> dict[str, np.ndarray]:
        """The per-row inputs of this variant, neutral (what padding rows hold): `targets`
        [R] int32 (-1: the sampled token), `processed` [R] bool, `bitmask` [R, W] int32."""
        rows: dict[str, np.ndarray] = {}
        if self.logprobs:
            rows["targets"] = np.full(num_rows, -1, np.int32)
        if self.processed:
            rows["processed"] = np.zeros(num_rows, bool)
        if self.constrained:
            from batchjax.engine import grammar  # only constrained jobs need the grammar library

            rows["bitmask"] = np.full((num_rows, grammar.num_words(vocab_size)), -1, np.int32)
        return rows


def _sample(raw, sampling_rows, rows, variant: StepVariant):
    """A step's tokens [R] and what `variant` reports of its logits rows `raw` [R, V] f32."""
    logits = raw
    if variant.constrained:
        from batchjax.engine import grammar

        logits = grammar.apply_token_bitmask(raw, rows["bitmask"])
    if variant.greedy:
        tokens = sampling.greedy_tokens(logits)
        filtered = logits
    else:
        temperature, top_k, top_p, min_p, seeds, samples, positions = sampling_rows
        filtered = sampling.filter_logits(logits, temperature, top_k, top_p, min_p)
        tokens = sampling.draw_tokens(logits, filtered, temperature, seeds, samples, positions)
    if not variant.logprobs:
        return tokens, {}
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    if variant.processed:
        logprobs = jnp.where(rows["processed"][:, None], jax.nn.log_softmax(filtered, axis=-1),
                             logprobs)
    targets = jnp.where(rows["targets"] < 0, tokens, rows["targets"])
    reported = sampling.token_logprobs(logprobs, targets, min(MAX_LOGPROBS, raw.shape[-1]))
    reported["argmax"] = jnp.argmax(raw, axis=-1).astype(jnp.int32)
    return tokens, reported


def _place(tree, shardings, local: bool):
    """`tree`'s arrays on `shardings` (one sharding, or a tree of them). With `local` (every
    device of the mesh is this process's), a plain `device_put`; across processes
    (`jax.distributed`), an array read in slices (spread over the processes already) is
    laid out again by all of them together; of any other, each process builds its devices'
    shards from its own copy of the whole array."""
    if local:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)
