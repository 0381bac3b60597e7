"""Runs token-id workloads through vLLM's offline `LLM.generate`; executed by vLLM's interpreter.

    VLLM_CPU_OMP_THREADS_BIND=0-1 python vllm_runner.py --model_dir DIR --workload NAME=PATH \
        --kv_budget_mb 1024 --dtype float32 --[no-]prefix_caching --[no-]chunked_prefill \
        --reps 3 --out OUT.json

One engine serves every workload and repetition (its start-up is not timed); the prefix cache is
emptied before each timed run, so a repetition never reuses the previous one's KV.
"""

from __future__ import annotations

import argparse
import os
import time

from peer_io import PeerRequest, check_lengths, common_arguments, process_age_s, read_requests, \
    run_record, write_report

_MIB = 1 << 20


def _generate(llm, requests: list[PeerRequest]) -> tuple[dict[str, list[int]], int, float]:
    """Greedy, EOS ignored, exactly `output_len` tokens each -> (token ids, computed, wall_s)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False)
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start
    token_ids = {r.id: list(o.outputs[0].token_ids) for r, o in zip(requests, outputs)}
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    computed = sum(len(r.prompt_token_ids) for r in requests) - cached
    return token_ids, computed, wall_s


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--prefix_caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--chunked_prefill", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max_num_seqs", type=int, default=256)
    args = parser.parse_args()

    import vllm
    from vllm import LLM

    workloads = [(name, read_requests(path)) for name, path in args.workload]
    longest = max(len(r.prompt_token_ids) + r.output_len for _, reqs in workloads for r in reqs)
    kv_bytes = int(args.kv_budget_mb * _MIB)
    # Without chunked prefill a whole prompt must fit into one step.
    max_batched = args.max_tokens_per_step if args.chunked_prefill else max(
        args.max_tokens_per_step, longest)
    config = {
        "dtype": args.dtype,
        "enable_prefix_caching": args.prefix_caching,
        "enable_chunked_prefill": args.chunked_prefill,
        "max_num_batched_tokens": max_batched,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": longest,
        "kv_cache_memory_bytes": kv_bytes,
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
    }
    llm = LLM(
        model=args.model_dir,
        dtype=args.dtype,
        seed=0,
        max_model_len=longest,
        max_num_batched_tokens=max_batched,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=args.prefix_caching,
        enable_chunked_prefill=args.chunked_prefill,
        kv_cache_memory_bytes=kv_bytes,
    )
    if args.warm_up:
        # One short untimed call, so lazy initialisation lands outside the timed runs.
        warm = [PeerRequest("warm-up", workloads[0][1][0].prompt_token_ids, 2)]
        _generate(llm, warm)

    runs = []
    for name, requests in workloads:
        first = None
        for rep in range(args.reps):
            if args.prefix_caching:
                llm.reset_prefix_cache()
            token_ids, computed, wall_s = _generate(llm, requests)
            check_lengths(requests, token_ids)
            runs.append(run_record(name, rep, requests, token_ids, wall_s, computed, first))
            runs[-1]["since_process_start_s"] = process_age_s()  # at its last result
            first = first or token_ids
            print(f"vllm {name} rep {rep}: {wall_s:.2f} s", flush=True)
    write_report(args.out, "vllm", config, {"vllm": vllm.__version__}, runs)


if __name__ == "__main__":
    main()
