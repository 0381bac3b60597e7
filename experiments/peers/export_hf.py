"""Dequantizes the default model's GGUF file into an f32 HuggingFace directory for the peers.

Run inside an interpreter that has transformers (and accelerate, which its GGUF loader needs):

    python export_hf.py --gguf_dir DIR --gguf_file FILE.gguf --out OUT_DIR

Every system then runs the same dequantized weights: batchjax reads the GGUF file itself, the
peers read OUT_DIR. The GGUF quantization record is dropped from the saved config, since the
saved tensors are plain f32 and a loader that saw it would look for GGUF tensors.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def export(gguf_dir: str, gguf_file: str, out_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    del model.config.quantization_config
    model.hf_quantizer = None
    # Written beside the target and renamed, so a half-written directory is never taken as done.
    tmp_dir = out_dir + ".partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf_dir", required=True)
    parser.add_argument("--gguf_file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    export(args.gguf_dir, args.gguf_file, args.out)


if __name__ == "__main__":
    main()
