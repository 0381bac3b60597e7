"""batchjax: offline LLM inference for JAX with global prefix sharing.

    import batchjax
    results = batchjax.generate(["Tell me a joke."], model="smollm2-135m")

`generate` and `Engine` import JAX and the model code on first use, so planning-only users
(`batchjax.schedule`, `batchjax.sim`) never pay for them. Both take `tensor_parallel`,
`data_parallel`, `distributed` ("local" or "ray") and `ray_address` to spread a job over chips
and hosts (`batchjax.cluster`); one device is the default.
"""

__version__ = "0.1.0"

_LAZY = {
    "generate": "batchjax.cluster.engine",
    "Engine": "batchjax.cluster.engine",
    "Result": "batchjax.engine.results",
    "Score": "batchjax.engine.engine",
    "Request": "batchjax.requests",
    "SamplingParams": "batchjax.requests",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchjax' has no attribute {name!r}")
