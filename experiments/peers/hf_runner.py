"""Runs token-id workloads through transformers' batched greedy `generate`; no prefix sharing.

    python hf_runner.py --model_dir DIR --workload NAME=PATH --kv_budget_mb 1024 \
        --dtype float32 --num_threads 2 --reps 3 --out OUT.json

Requests are sorted by prompt length (least padding) and packed into batches whose padded KV
cache, `batch * (longest prompt + longest output) * bytes per token`, fits the KV budget every
system gets. Each batch is left-padded and decodes its longest output length; every request
keeps exactly its own `output_len` tokens. EOS is neither a stop nor suppressed, as with
vLLM's `ignore_eos`.
"""

from __future__ import annotations

import time

from peer_io import PeerRequest, check_lengths, common_arguments, read_requests, run_record, \
    write_report

_MIB = 1 << 20


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V of every layer for one token."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def pack_batches(requests: list[PeerRequest], kv_budget_bytes: int,
                 bytes_per_token: int) -> list[list[PeerRequest]]:
    """Length-sorted batches whose padded KV cache stays within the budget."""
    ordered = sorted(requests, key=lambda r: (len(r.prompt_token_ids), r.output_len))
    batches: list[list[PeerRequest]] = []
    batch: list[PeerRequest] = []
    longest_prompt = longest_output = 0
    for r in ordered:
        prompt = max(longest_prompt, len(r.prompt_token_ids))
        output = max(longest_output, r.output_len)
        if batch and (len(batch) + 1) * (prompt + output) * bytes_per_token > kv_budget_bytes:
            batches.append(batch)
            batch, prompt, output = [], len(r.prompt_token_ids), r.output_len
        if (prompt + output) * bytes_per_token > kv_budget_bytes:
            raise ValueError(f"request {r.id} alone needs more KV than the budget")
        batch.append(r)
        longest_prompt, longest_output = prompt, output
    if batch:
        batches.append(batch)
    return batches


def _generate(model, batches: list[list[PeerRequest]],
              pad_token_id: int) -> tuple[dict[str, list[int]], float]:
    import torch
    from transformers import GenerationConfig

    token_ids: dict[str, list[int]] = {}
    start = time.perf_counter()
    for batch in batches:
        width = max(len(r.prompt_token_ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            input_ids[row, width - n:] = torch.tensor(r.prompt_token_ids)
            attention_mask[row, width - n:] = 1
        # No EOS at all, so generation neither stops at it nor masks it out (min_new_tokens would).
        generation_config = GenerationConfig(
            do_sample=False, eos_token_id=None, pad_token_id=pad_token_id,
            max_new_tokens=max(r.output_len for r in batch))
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=generation_config)
        for row, r in enumerate(batch):
            token_ids[r.id] = out[row, width:width + r.output_len].tolist()
    return token_ids, time.perf_counter() - start


def main() -> None:
    args = common_arguments(__doc__.splitlines()[0]).parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.num_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = 0
    workloads = [(name, read_requests(path)) for name, path in args.workload]
    bytes_per_token = kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)
    kv_budget_bytes = int(args.kv_budget_mb * _MIB)
    config = {
        "dtype": args.dtype,
        "num_threads": args.num_threads,
        "kv_budget_bytes": kv_budget_bytes,
        "kv_bytes_per_token": bytes_per_token,
        "attn_implementation": model.config._attn_implementation,
        "batching": "length-sorted, padded KV within the budget, left padding",
    }
    if args.warm_up:
        warm = [PeerRequest("warm-up", workloads[0][1][0].prompt_token_ids, 2)]
        _generate(model, [warm], pad_token_id)

    runs = []
    for name, requests in workloads:
        batches = pack_batches(requests, kv_budget_bytes, bytes_per_token)
        first = None
        for rep in range(args.reps):
            token_ids, wall_s = _generate(model, batches, pad_token_id)
            check_lengths(requests, token_ids)
            # Every prompt token is computed: transformers shares nothing between requests.
            computed = sum(len(r.prompt_token_ids) for r in requests)
            runs.append(run_record(name, rep, requests, token_ids, wall_s, computed, first))
            runs[-1]["num_batches"] = len(batches)
            runs[-1]["peak_kv_bytes"] = max(
                len(b) * (max(len(r.prompt_token_ids) for r in b) + max(r.output_len for r in b))
                for b in batches) * bytes_per_token
            first = first or token_ids
            print(f"transformers {name} rep {rep}: {wall_s:.2f} s", flush=True)
    write_report(args.out, "transformers", config, {"transformers": transformers.__version__,
                                                    "torch": torch.__version__}, runs)


if __name__ == "__main__":
    main()
