"""Where the tasks' data files are, as absolute paths, so the tasks load from any directory.

lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset`, which reads a relative
path against the current directory. The task YAMLs name these constants with `!function`,
which lm-eval resolves in a module beside the YAML file (any attribute, not only functions).
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))

MC_TEST = os.path.join(_HERE, "mc_test.jsonl")
MC_TRAIN = os.path.join(_HERE, "mc_train.jsonl")
GEN_TEST = os.path.join(_HERE, "gen_test.jsonl")
GEN_TRAIN = os.path.join(_HERE, "gen_train.jsonl")
