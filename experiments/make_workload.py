"""Writes a synthetic token-id workload as JSONL.

python -m experiments.make_workload --kind=microbenchmark --prefix_len=2000 --distinct_len=200 \
    --output_len=100 --degree=16 --num_requests=6400 --out=W.jsonl
"""

from absl import app, flags

from batchjax import workloads

_KIND = flags.DEFINE_enum("kind", "microbenchmark", ["microbenchmark", "industry", "no_sharing"],
                          "Workload shape.")
_OUT = flags.DEFINE_string("out", None, "Output JSONL path.", required=True)
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", 2000, "Shared prefix tokens (microbenchmark); "
                                   "prompt tokens (no_sharing).")
_DISTINCT_LEN = flags.DEFINE_integer("distinct_len", 200, "Distinct tokens per request.")
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 100, "Output tokens per request.")
_DEGREE = flags.DEFINE_integer("degree", 16, "Requests per shared prefix (microbenchmark).")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 6400, "Requests.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv: list[str]) -> None:
    del argv
    if _KIND.value == "microbenchmark":
        workload = workloads.microbenchmark(
            _PREFIX_LEN.value, _DISTINCT_LEN.value, _OUTPUT_LEN.value, _DEGREE.value,
            _NUM_REQUESTS.value, seed=_SEED.value,
        )
    elif _KIND.value == "industry":
        workload = workloads.industry_like(_NUM_REQUESTS.value, seed=_SEED.value)
    else:
        workload = workloads.no_sharing(
            _PREFIX_LEN.value, _OUTPUT_LEN.value, _NUM_REQUESTS.value, seed=_SEED.value
        )
    workloads.write_jsonl(workload, _OUT.value)
    print(f"wrote {len(workload):,} requests ({workload.logical_prefill_tokens:,} prompt tokens) "
          f"to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
