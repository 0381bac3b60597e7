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
"""

from __future__ import annotations

import dataclasses

from batchjax.schedule.step_plan import StepPlan
from batchjax.sim.hardware import Device, ModelShape


@dataclasses.dataclass(frozen=True)
class CostModel:
    device: Device
    model: ModelShape
    compute_efficiency: float = 0.6  # achieved / peak FLOP/s
    memory_efficiency: float = 0.8  # achieved / peak HBM bandwidth
    step_overhead_s: float = 0.002  # host scheduling and launch per step

    def kv_budget_pages(
        self, page_size: int, memory_fraction: float = 0.9, activation_bytes: int = 2 << 30
    ) -> int:
        """Pages left for KV once weights and activations have their share (vLLM's
        gpu_memory_utilization is `memory_fraction`)."""
        free = self.device.memory_bytes * memory_fraction - self.model.weight_bytes
        pages = int((free - activation_bytes) // (page_size * self.model.kv_bytes_per_token))
        if pages < 1:
            raise ValueError(
                f"{self.model.name} ({self.model.weight_bytes / 2**30:.1f} GiB of weights) "
                f"leaves no KV memory on {self.device.name}"
            )
        return pages

    def step_seconds(self, step: StepPlan) -> float:
        m = self.model
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
        dense_flops = 2 * (m.num_layers * m.layer_params * tokens + m.lm_head_params * sampled)
        dense = max(dense_flops / flops_per_s, m.weight_bytes / bytes_per_s)

        attention_flops = 4 * m.num_layers * m.num_heads * m.head_dim * pairs
        attention_bytes = (kv_read + tokens) * m.kv_bytes_per_token  # reads + new KV writes
        attention = max(attention_flops / flops_per_s, attention_bytes / bytes_per_s)
        return dense + attention + self.step_overhead_s
