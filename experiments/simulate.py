"""Replays a policy on a token-id workload with the roofline cost model (times are estimates).

python -m experiments.simulate --input=W.jsonl --policy=batchllm --device=a100-80gb \
    --model=llama-3.1-8b --metrics_out=M.json --plot=M.png
"""

import json

from absl import app, flags

from batchjax import metrics as run_metrics
from batchjax import workloads
from batchjax.schedule.policies import POLICIES
from batchjax.sim import hardware
from batchjax.sim.plotting import plot_trace
from batchjax.sim.simulate import simulate

_INPUT = flags.DEFINE_string("input", None, "Token-id JSONL workload.", required=True)
_POLICY = flags.DEFINE_enum("policy", "batchllm", list(POLICIES), "Scheduling policy.")
_DEVICE = flags.DEFINE_enum("device", "a100-80gb", sorted(hardware.DEVICES), "Device.")
_MODEL = flags.DEFINE_enum("model", "llama-3.1-8b", sorted(hardware.MODELS), "Model shape.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_MAX_TOKENS_PER_STEP = flags.DEFINE_integer("max_tokens_per_step", 8192, "Step token budget.")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 256, "Request cap of the baselines.")
_METRICS_OUT = flags.DEFINE_string("metrics_out", None, "Write the metrics JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Write a PNG of KV pages and tokens per step here.")


def main(argv: list[str]) -> None:
    del argv
    workload = workloads.read_jsonl(_INPUT.value)
    result = simulate(
        workload, _POLICY.value, _DEVICE.value, _MODEL.value, page_size=_PAGE_SIZE.value,
        max_tokens_per_step=_MAX_TOKENS_PER_STEP.value, max_num_seqs=_MAX_NUM_SEQS.value,
    )
    print(run_metrics.summary_table(
        result.metrics, f"{workload.name} on {_DEVICE.value} (SIMULATED: times are estimates)"
    ))
    if _METRICS_OUT.value:
        with open(_METRICS_OUT.value, "w", encoding="utf-8") as f:
            json.dump(result.metrics, f, indent=2)
    if _PLOT.value:
        plot_trace([result], _PLOT.value)


if __name__ == "__main__":
    app.run(main)
