"""Converts any model spec to a batchjax orbax checkpoint, which later starts load quickly.

    python -m experiments.convert --model=smollm2-135m --out=checkpoints/smollm2 [--dtype=bfloat16]

`--model` takes whatever `load_model` takes: a model name, a .gguf file or a HF directory.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
from absl import app, flags, logging

from batchjax.models.registry import DEFAULT_MODEL, convert_to_checkpoint

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "smollm2-135m, a .gguf file or a HF dir.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the checkpoint to.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")


def main(argv):
    del argv
    start = time.perf_counter()
    convert_to_checkpoint(_MODEL.value, _OUT.value, jnp.dtype(_DTYPE.value))
    logging.info("wrote %s in %.1f s", _OUT.value, time.perf_counter() - start)


if __name__ == "__main__":
    app.run(main)
