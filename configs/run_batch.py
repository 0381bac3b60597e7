"""Defaults of `python -m experiments.run_batch`; override as `--config.key=value`."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m"
    c.policy = "batchllm"
    c.attention = "xla"
    c.cpu_kernels = "auto"  # native CPU kernels where they run, else XLA's code ("xla")
    c.dtype = "float32"
    c.page_size = 16
    c.kv_budget_mb = 1024.0
    c.max_tokens_per_step = 512
    c.max_num_seqs = 256
    # batchllm: shared segments per request's chain (1: BatchLLM's single level; more: the
    # prefix tree, a cascade of shared segments) and the least tokens a segment must save.
    c.prefix_levels = 4
    c.min_saved_tokens = 16
    c.overlap = True  # plan and launch step N+1 while step N runs (same results either way)
    c.tensor_parallel = 1  # devices per replica (heads and MLP columns split over them)
    c.data_parallel = 1  # replicas, each with its own KV pool and whole prefix groups
    # tensor parallel: the embedding table's and LM head's split, TABLE/HEAD with TABLE one of
    # replicated, vocab, embed and HEAD one of vocab, embed
    c.placement = "replicated/vocab"
    c.distributed = "local"  # replicas in this process, or "ray": one Ray actor each
    c.ray_address = ""  # a Ray cluster to join; "" starts one in this process
    c.strict = False
    c.print_results = 8  # answers echoed to the terminal at the end (0: none)
    return c
