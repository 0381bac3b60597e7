"""lm-evaluation-harness support: importing this package registers the `batchjax` model.

    import batchjax.evals
    lm_eval.simple_evaluate(model="batchjax", model_args="model=smollm2-135m", tasks=[...])

or, with an engine already loaded, `model=batchjax.evals.BatchjaxLM(engine=engine)`.
`python -m experiments.lm_eval` is lm-eval's own command line with this model as default.
"""

from batchjax.evals.lm_eval_model import BatchjaxLM

__all__ = ["BatchjaxLM"]
