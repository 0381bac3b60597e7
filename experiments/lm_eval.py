"""lm-evaluation-harness's own command line, with the `batchjax` model as default.

    python -m experiments.lm_eval --tasks batchjax_mc,batchjax_gen \
        --include_path experiments/data/lm_eval \
        --model_args model=smollm2-135m,dtype=float32,policy=batchllm[,kv_budget_mb=N,...] \
        [--num_fewshot N] [--limit N] [--output_path DIR] [--log_samples] [--model hf ...]

Every flag is lm-eval's (`lm-eval run --help`); `--model` defaults to batchjax (a `--config`
file's model is used only with `--model` given too). Nothing is downloaded: datasets and the
hub are offline, so tasks must read local files (`experiments/data/lm_eval` has two).
Run it as a module: as a script its own name would shadow the `lm_eval` package.
"""

from __future__ import annotations

import os
import sys

_SUBCOMMANDS_WITHOUT_MODEL = ("ls", "validate")


def with_default_model(argv: list[str]) -> list[str]:
    """`argv` with `--model batchjax` added to a run that names no model."""
    if not argv or argv[0] in _SUBCOMMANDS_WITHOUT_MODEL:
        return argv
    if any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        return argv
    return [*argv, "--model", "batchjax"]


def main() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import batchjax.evals  # noqa: F401 - registers the batchjax model
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *with_default_model(sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
