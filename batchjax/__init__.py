"""batchjax: offline LLM inference for JAX with global prefix sharing."""

__version__ = "0.1.0"
