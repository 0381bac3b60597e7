"""Roofline estimate of one step's time on a device, from its `StepPlan` alone.

A step is two kinds of kernels, each bounded by compute or by memory traffic:
- dense layers (projections, MLP, and the LM head at sampled positions): every step streams
  all weights once and does 2 FLOPs per parameter per token;
- attention: each chunk reads its own KV context once for all its query tokens (flash-style),
  writes its new KV, and does 4 * heads * head_dim FLOPs per (query, key) pair per layer.
  A chunk that attends a group's shared prefix does not read that prefix itself: the prefix
  KV is read once per step for all the group's queries (BatchLLM's prefix attention). The
  baselines keep cached prefix pages in each request's own page table, so every request
  reads them again.
Step time = sum over the two of max(compute, memory) + a fixed per-step overhead. These are
estimates; real kernels reach less than peak, which the efficiencies stand for.

Tensor parallelism over T chips (Megatron-style, as vLLM shards a Llama): every chip holds 1/T
of every weight matrix and 1/T of the attention heads, so each chip's FLOPs and HBM bytes are
the step's divided by T (when T exceeds the KV heads, each chip keeps one KV head: the KV is
replicated, its projections are still counted as split, a small error). The chips then
exchange activations, which is added to the step, not overlapped with the kernels:
- an all-reduce of the step's `tokens x hidden` activations after every layer's attention
  output projection and after its MLP down projection (2 per layer);
- an all-gather of the sampled rows' logits from the vocabulary-split LM head.
That is the engine's default placement (`batchjax.sharding.rules`): the embedding table is
whole on every chip, so its lookup needs no collective.
A ring all-reduce of B bytes costs `2 (T - 1) / T * B / link + latency`, an all-gather
`(T - 1) / T * B / link + latency`, with `link` one direction of a chip's link at
`link_efficiency`. With T = 1 nothing is added and nothing divided: the one-chip estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from batchjax.schedule.step_plan import StepPlan
from batchjax.sim.hardware import GIB, Device, ModelShape


class DoesNotFit(ValueError):
    """The model cannot be served this way: memory too small, or heads that do not split."""


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One step's estimated seconds on each chip of a replica, by part."""

    dense_s: float
    attention_s: float
    communication_s: float
    overhead_s: float
    flops: float = 0.0  # the step's model FLOPs (dense and attention, all chips together)

    @property
    def total_s(self) -> float:
        return self.dense_s + self.attention_s + self.communication_s + self.overhead_s


def check_tensor_parallel(device: Device, model: ModelShape, tensor_parallel: int) -> None:
    """Raises `DoesNotFit` unless `model`'s layers split over `tensor_parallel` `device`s."""
    t = tensor_parallel
    if t < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {t}")
    if t == 1:
        return
    if device.link_bytes_per_s is None:
        raise DoesNotFit(f"{device.name} has no chip-to-chip link figure: tensor_parallel=1 only")
    if t > device.link_domain_chips:
        raise DoesNotFit(
            f"tensor_parallel={t} exceeds the {device.link_domain_chips} {device.name} chips "
            f"one link domain holds"
        )
    if model.num_heads % t:
        raise DoesNotFit(
            f"{model.name}'s {model.num_heads} attention heads do not split over "
            f"tensor_parallel={t}; use a divisor of {model.num_heads}"
        )
    kv = model.num_kv_heads
    if kv % t and t % kv:
        raise DoesNotFit(
            f"{model.name}'s {kv} KV heads neither split over tensor_parallel={t} nor "
            f"replicate evenly onto it; use a divisor or a multiple of {kv}"
        )


@dataclasses.dataclass(frozen=True)
class CostModel:
    device: Device
    model: ModelShape
    compute_efficiency: float = 0.6  # achieved / peak FLOP/s
    memory_efficiency: float = 0.8  # achieved / peak HBM bandwidth
    step_overhead_s: float = 0.002  # host scheduling and launch per step
    tensor_parallel: int = 1  # chips of one replica, each holding 1/T of every layer
    link_efficiency: float = 0.8  # achieved / peak link bandwidth of a ring collective

    def __post_init__(self) -> None:
        check_tensor_parallel(self.device, self.model, self.tensor_parallel)

    @property
    def kv_heads_per_chip(self) -> int:
        return max(self.model.num_kv_heads // self.tensor_parallel, 1)

    @property
    def kv_bytes_per_token_per_chip(self) -> int:
        """K and V of one token across all layers, the share one chip stores."""
        m = self.model
        return 2 * m.num_layers * self.kv_heads_per_chip * m.head_dim * m.bytes_per_value

    @property
    def weight_bytes_per_chip(self) -> float:
        return self.model.weight_bytes / self.tensor_parallel

    def _kv_pages(self, page_size: int, memory_fraction: float, activation_bytes: int) -> int:
        free = self.device.memory_bytes * memory_fraction - self.weight_bytes_per_chip
        return int((free - activation_bytes) // (page_size * self.kv_bytes_per_token_per_chip))

    def kv_budget_pages(
        self, page_size: int, memory_fraction: float = 0.9, activation_bytes: int = 2 << 30
    ) -> int:
        """Pages left for KV once weights and activations have their share (vLLM's
        gpu_memory_utilization is `memory_fraction`). With tensor parallelism a page spans
        the replica's chips: each holds its share of the weights and of every page's KV, and
        sets `activation_bytes` aside."""
        pages = self._kv_pages(page_size, memory_fraction, activation_bytes)
        if pages >= 1:
            return pages
        m, d, t = self.model, self.device, self.tensor_parallel
        usable = d.memory_bytes * memory_fraction
        fits = smallest_tensor_parallel(d, m, page_size, memory_fraction, activation_bytes)
        hint = (f"; the smallest tensor_parallel that fits is {fits}" if fits is not None else
                f"; no tensor_parallel up to {d.link_domain_chips} fits it on {d.name}")
        chips = f"{t} x {d.name}" if t > 1 else f"one {d.name}"
        weights = f"{m.weight_bytes / GIB:.1f} GiB of weights"
        per_chip = f"{self.weight_bytes_per_chip / GIB:.1f} GiB per chip" if t > 1 else ""
        if self.weight_bytes_per_chip >= usable:
            raise DoesNotFit(
                f"{m.name} does not fit on {chips}: its {weights}"
                f"{f' ({per_chip})' if per_chip else ''} exceed the "
                f"{usable / GIB:.1f} GiB usable ({memory_fraction:.0%}) of a chip's "
                f"{d.memory_bytes / GIB:.1f} GiB, leaving no KV memory" + hint
            )
        if per_chip:
            weights += f", {per_chip}"
        raise DoesNotFit(
            f"{m.name} ({weights}) leaves no KV memory on {chips} ({usable / GIB:.1f} GiB "
            f"usable per chip, {activation_bytes / GIB:.1f} GiB of it for activations)" + hint
        )

    def communication_seconds(self, tokens: int, sampled: int) -> float:
        """The tensor-parallel collectives of a step of `tokens` tokens, `sampled` sampled."""
        t = self.tensor_parallel
        if t == 1 or tokens == 0:
            return 0.0
        m, d = self.model, self.device
        link = d.link_bytes_per_s * self.link_efficiency
        activations = tokens * m.hidden_size * m.bytes_per_value
        all_reduce = 2 * (t - 1) / t * activations / link + d.collective_latency_s
        seconds = 2 * m.num_layers * all_reduce  # after o_proj and down_proj
        if sampled:
            logits = sampled * m.vocab_size * m.bytes_per_value
            seconds += (t - 1) / t * logits / link + d.collective_latency_s
        return seconds

    def step_cost(self, step: StepPlan) -> StepCost:
        m, t = self.model, self.tensor_parallel
        flops_per_s = self.device.peak_flops * self.compute_efficiency
        bytes_per_s = self.device.hbm_bytes_per_s * self.memory_efficiency
        # (query, key) pairs and KV tokens read; causal own part, unmasked shared prefix.
        tokens = sampled = pairs = kv_read = 0
        for c in step.chunks:
            n, start = len(c.token_ids), c.own_start
            tokens += n
            sampled += c.sample
            pairs += n * (start + c.prefix_len) + n * (n + 1) // 2
            kv_read += start + n
        kv_read += sum(p.prefix_len for p in step.prefixes)
        # Per chip: 1/T of the FLOPs and of the weights (T = 1 divides nothing).
        dense_flops = 2 * (m.num_layers * m.layer_params * tokens + m.lm_head_params * sampled)
        dense = max(dense_flops / t / flops_per_s, self.weight_bytes_per_chip / bytes_per_s)

        attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * pairs
        # reads + new KV writes, of this chip's KV heads
        attention_bytes = (kv_read + tokens) * self.kv_bytes_per_token_per_chip
        attention = max(attention_flops / t / flops_per_s, attention_bytes / bytes_per_s)
        return StepCost(
            dense, attention, self.communication_seconds(tokens, sampled), self.step_overhead_s,
            float(dense_flops + attention_flops),
        )

    def step_seconds(self, step: StepPlan) -> float:
        return self.step_cost(step).total_s

    def group_seconds(
        self, prefix_len: int, own_lens: Sequence[int], decode_lens: Sequence[float]
    ) -> float:
        """A prefix group's share of a job's time, to rank and balance groups (an estimate).

        The group's tokens as part of full steps: every token's dense FLOPs (the prefix once,
        each suffix, each output token), and its attention, bounded by compute or by KV
        traffic (the prefix read once per step for the whole group, each request's own
        context at every decode step). The weights' streaming, the collectives and the
        per-step overhead are shared by a step's whole batch, so they are left out.
        """
        m, t = self.model, self.tensor_parallel
        own = np.asarray(own_lens, dtype=np.float64)
        decode = np.asarray(decode_lens, dtype=np.float64)
        p = float(prefix_len)
        tokens = p + own.sum() + decode.sum()
        sampled = float(len(own)) + decode.sum()
        pairs = (p * (p + 1) / 2 + (own * p + own * (own + 1) / 2).sum()
                 + (decode * (p + own) + decode * (decode + 1) / 2).sum())
        kv_read = p + own.sum() + (decode * own + decode * (decode + 1) / 2).sum()
        kv_read += p * (decode.max() if decode.size else 0.0)
        flops_per_s = self.device.peak_flops * self.compute_efficiency
        bytes_per_s = self.device.hbm_bytes_per_s * self.memory_efficiency
        dense_flops = 2 * (m.num_layers * m.layer_params * tokens + m.lm_head_params * sampled)
        attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * pairs
        attention_bytes = (kv_read + tokens) * self.kv_bytes_per_token_per_chip
        attention = max(attention_flops / t / flops_per_s, attention_bytes / bytes_per_s)
        return float(dense_flops / t / flops_per_s + attention)


def smallest_tensor_parallel(
    device: Device,
    model: ModelShape,
    page_size: int = 16,
    memory_fraction: float = 0.9,
    activation_bytes: int = 2 << 30,
) -> int | None:
    """The fewest chips of `device` whose split of `model` leaves KV memory, or None."""
    for t in range(1, device.link_domain_chips + 1):
        try:
            cost = CostModel(device, model, tensor_parallel=t)
        except DoesNotFit:
            continue
        if cost._kv_pages(page_size, memory_fraction, activation_bytes) >= 1:
            return t
    return None
