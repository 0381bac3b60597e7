"""The fault campaign's parts at suite size: hostile model files are refused naming the file,
the sandbox refuses a template that reaches for Python internals, and a job killed at random
instants resumes to the uninterrupted run's file."""

import os

import jinja2
import numpy as np
import pytest

from batchjax.models.config import ModelFileError
from batchjax.models.registry import load_model
from batchjax.models.tokenizer import Tokenizer
from experiments import faults


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return faults.hostile_files(str(tmp_path_factory.mktemp("hostile")))


def test_an_undamaged_file_of_the_same_kind_loads(tmp_path):
    faults._write_hf(str(tmp_path / "ok"))
    assert load_model(str(tmp_path / "ok")).config.hidden_size == 64


def test_every_hostile_model_file_is_refused_naming_the_file(hostile):
    assert len(hostile) >= 10
    for kind, path, bad_file in hostile:
        with pytest.raises(ModelFileError) as e:
            load_model(path)
        assert e.value.path == bad_file, kind
        assert bad_file in str(e.value) and e.value.reason, kind


def test_a_chat_template_reaching_python_internals_is_refused(smollm2_tokenizer):
    evil = Tokenizer(smollm2_tokenizer.backend, eos_token_ids=smollm2_tokenizer.eos_token_ids,
                     chat_template=faults.EVIL_TEMPLATE)
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "hi"}])
    fine = Tokenizer(smollm2_tokenizer.backend, eos_token_ids=smollm2_tokenizer.eos_token_ids,
                     chat_template="{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    assert fine.apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"


def test_kills_at_random_instants_resume_to_the_uninterrupted_file(tmp_path):
    model = faults.make_tiny_model(str(tmp_path / "tiny"))
    report = faults.kill_campaign(model, str(tmp_path / "work"), 2, np.random.default_rng(5),
                                  max_tokens=16)
    assert report["kills"] == 2 and sum(report["phases"].values()) == 2
    assert report["lines"] == len(faults.kill_job_lines(np.random.default_rng(5), 16))
    assert report["identical_but_cache_counts"], report
    assert not os.path.exists(tmp_path / "work" / "killed.jsonl.lock")
