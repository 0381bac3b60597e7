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
    report = faults.kill_campaign(model, str(tmp_path / "work"), 4, np.random.default_rng(5),
                                  max_tokens=16)
    assert report["kills"] == 4 and sum(report["phases"].values()) == 4
    assert report["phases"]["mid-run"] >= 1 and report["phases"]["after the last line"] >= 1
    assert report["lines"] == len(faults.kill_job_lines(np.random.default_rng(5), 16))
    assert report["identical_but_cache_counts"], report
    assert not os.path.exists(tmp_path / "work" / "killed.jsonl.lock")


# -- resources -------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FULL_DISK_AFTER = """
import errno, sys
from batchjax.engine import results
real = results.ResultsJournal.append
room = int(sys.argv[1])
def append(self, result, _n=[0]):
    if result.error is None:
        _n[0] += 1
        if _n[0] > room:
            raise OSError(errno.ENOSPC, "No space left on device")
    real(self, result)
results.ResultsJournal.append = append
sys.argv = ["run_batch", *sys.argv[2:]]
from absl import app
from experiments import run_batch
app.run(run_batch.main)
"""


def _job(tmp_path, n=6):
    import json

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [5, 6 + i],
                                       "max_tokens": 3, "ignore_eos": True}) + "\n"
                           for i in range(n)))
    return inp


def _run_batch(*args, script=None, timeout=300):
    import subprocess
    import sys

    cmd = ([sys.executable, "-c", script, *args] if script
           else [sys.executable, "-m", "experiments.run_batch", *args])
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path, tiny_llama_dir):
    inp = _job(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    proc = _run_batch(f"--input={inp}", f"--output={tmp_path / 'a_file' / 'out.jsonl'}",
                      f"--model={tiny_llama_dir}")
    assert proc.returncode != 0
    assert "run_batch: cannot write the output" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run_batch(f"--input={tmp_path / 'missing.jsonl'}", f"--output={tmp_path / 'o.jsonl'}",
                      f"--model={tiny_llama_dir}")
    assert "run_batch: cannot read the input" in proc.stderr and "Traceback" not in proc.stderr


def test_a_kv_budget_past_free_memory_is_refused_before_any_work(tmp_path, tiny_llama_dir):
    from batchjax.engine.engine import Engine

    with pytest.raises(ValueError, match="GiB of KV on .*more than the .* GiB it has free"):
        Engine(str(tiny_llama_dir), kv_budget_mb=2**30, progress=False)  # a petabyte
    inp, out = _job(tmp_path), tmp_path / "out.jsonl"
    proc = _run_batch(f"--input={inp}", f"--output={out}", f"--model={tiny_llama_dir}",
                      "--kv_budget_mb=1073741824")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot start the engine: ValueError: kv_budget_mb=" in proc.stderr
    assert out.read_bytes() == b""


def test_a_full_disk_mid_run_keeps_what_was_written_and_resumes(tmp_path, tiny_llama_dir):
    import json

    inp, out = _job(tmp_path), tmp_path / "out.jsonl"
    flags = [f"--input={inp}", f"--output={out}", f"--model={tiny_llama_dir}",
             "--max_tokens_per_step=4", "--config.print_results=0"]
    proc = _run_batch("2", *flags, script=_FULL_DISK_AFTER)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "No space left on device; the 2 lines written are kept" in proc.stderr
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(kept) == 2
    assert not (tmp_path / "out.jsonl.lock").exists()  # released on the way out
    proc = _run_batch(*flags)  # the disk has room again
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in final] == [f"r{i}" for i in range(6)]
    assert all(len(line["token_ids"]) == 3 for line in final)


def test_a_large_journal_resumes_and_simulated_jobs_report_their_memory(tmp_path):
    report = faults.load_campaign(str(tmp_path), sizes=(200, 2_000))
    assert [j["requests"] for j in report["jobs"]] == [200, 2_000]
    assert all(j["peak_rss_mib"] > 10 and j["seconds"] > 0 for j in report["jobs"])
    assert report["resumed"] == 2_000 and report["journal_ok"]  # the torn line dropped


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 KiB to fill (`remount(size)` grows it); skips where mounting is refused."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not let the tests mount a tmpfs")

    def remount(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_mid_run_and_at_the_final_rewrite(tmp_path, tiny_llama_dir, small_disk):
    import json

    mount, remount = small_disk
    inp, out = _job(tmp_path, n=60), mount / "out.jsonl"
    flags = [f"--input={inp}", f"--output={out}", f"--model={tiny_llama_dir}",
             "--config.print_results=0"]
    proc = _run_batch(*flags)  # 60 lines of about 200 bytes do not fit in 8 KiB
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "are kept" in proc.stderr
    kept = out.read_bytes()
    assert kept.endswith(b"\n") and 0 < kept.count(b"\n") < 60  # whole lines only
    remount(f"{len(kept) + 16 * 1024}")  # room for the rest, not for a second copy
    proc = _run_batch(*flags)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "writing the final" in proc.stderr and "finishes it" in proc.stderr
    assert not (mount / "out.jsonl.tmp").exists()
    journal = out.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in journal) == sorted(f"r{i}" for i in range(60))
    remount("1m")
    proc = _run_batch(*flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
        f"r{i}" for i in range(60)]
