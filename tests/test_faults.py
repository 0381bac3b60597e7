"""The fault campaign's parts at suite size: hostile model files are refused naming the file,
the sandbox refuses a template that reaches for Python internals, and a job killed at random
instants resumes to the uninterrupted run's file."""

import json
import os

import jinja2
import numpy as np
import pytest

from batchjax.models.config import ModelFileError
from batchjax.models.registry import load_model
from batchjax.models.tiny import make_tiny_model
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
    model = make_tiny_model(str(tmp_path / "tiny"))
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

# The final rename fails, as on a disk remounted read-only under the job (the journal's own
# appends and every other rename still work).
_RENAME_REFUSED = """
import errno, os, sys
real = os.replace
def replace(src, dst, *args, **kwargs):
    if os.fspath(src).endswith(".jsonl.tmp"):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(src))
    return real(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["run_batch", *sys.argv[1:]]
from absl import app
from experiments import run_batch
app.run(run_batch.main)
"""


def _job(tmp_path, n=6):
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
    # Its directory exists but the output cannot be opened: the journal fails, not makedirs,
    # and lets go of the lock it took first.
    (tmp_path / "a_dir").mkdir()
    proc = _run_batch(f"--input={inp}", f"--output={tmp_path / 'a_dir'}",
                      f"--model={tiny_llama_dir}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"run_batch: cannot write the output {tmp_path / 'a_dir'}: " in proc.stderr
    assert "Is a directory" in proc.stderr
    assert not (tmp_path / "a_dir.lock").exists()


def test_a_missing_input_is_a_clear_error_before_the_output_is_touched(tmp_path, tiny_llama_dir):
    proc = _run_batch(f"--input={tmp_path / 'missing.jsonl'}", f"--output={tmp_path / 'o.jsonl'}",
                      f"--model={tiny_llama_dir}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"run_batch: cannot read the input: [Errno 2] No such file or directory: " \
           f"'{tmp_path / 'missing.jsonl'}'" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.lock").exists()


def test_a_kv_budget_past_free_memory_is_refused_before_any_work(tmp_path, tiny_llama_dir):
    from batchjax.engine.engine import Engine

    with pytest.raises(ValueError, match="GiB of KV on .*more than the .* GiB it has free"):
        Engine(str(tiny_llama_dir), kv_budget_mb=2**30, progress=False)  # a petabyte
    inp, out = _job(tmp_path), tmp_path / "out.jsonl"
    # A line an earlier run wrote: the refused run must keep it as it was.
    earlier = json.dumps({"id": "r0", "text": None, "token_ids": [7, 8, 9],
                          "finish_reason": "length", "usage": {}}).encode() + b"\n"
    out.write_bytes(earlier)
    proc = _run_batch(f"--input={inp}", f"--output={out}", f"--model={tiny_llama_dir}",
                      "--kv_budget_mb=1073741824")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot start the engine: ValueError: kv_budget_mb=1.07374e+09 needs " in proc.stderr
    assert out.read_bytes() == earlier
    assert not (tmp_path / "out.jsonl.lock").exists()


class _Device:
    """A device with the memory statistics of an accelerator (`limit` None: none at all)."""

    def __init__(self, name, limit=None, in_use=0, platform="gpu"):
        self.name, self.platform, self._stats = name, platform, None
        if limit is not None:
            self._stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self):
        return self._stats

    def __str__(self):
        return self.name


GIB = 2**30


def test_the_kv_check_counts_the_null_page_and_what_is_in_use_on_every_device():
    from batchjax.engine.page_pool import check_kv_fits

    # 3 GiB free on each of two devices: 24 quarter-GiB pages in all, the null page one of them.
    devices = [_Device("gpu:0", 4 * GIB, 1 * GIB), _Device("gpu:1", 4 * GIB, 1 * GIB)]
    check_kv_fits(23, GIB // 4, devices, kv_budget_mb=23 * 256)
    with pytest.raises(ValueError, match=r"^kv_budget_mb=6144 needs 3\.12 GiB of KV on gpu:0, "
                                         r"more than the 3\.00 GiB it has free; lower"):
        check_kv_fits(24, GIB // 4, devices, kv_budget_mb=6144)
    # Every device must hold its share, not only the first.
    tight = [_Device("gpu:0", 4 * GIB, 1 * GIB), _Device("gpu:1", 4 * GIB, 2 * GIB)]
    with pytest.raises(ValueError, match="KV on gpu:1, more than the 2.00 GiB"):
        check_kv_fits(23, GIB // 4, tight, kv_budget_mb=1)
    # A backend that reports no memory cannot be checked, and is not refused.
    check_kv_fits(10**9, GIB, [_Device("gpu:0")], kv_budget_mb=1)


def test_cpu_devices_share_one_host_memory_in_the_kv_check():
    from batchjax.engine.page_pool import check_kv_fits

    # Two host devices seeing the same 3 GiB: the pool must fit in it whole, not half on each.
    host = [_Device(f"cpu:{i}", 4 * GIB, 1 * GIB, platform="cpu") for i in range(2)]
    check_kv_fits(11, GIB // 4, host, kv_budget_mb=1)
    with pytest.raises(ValueError, match="needs 3.25 GiB of KV on cpu:0"):
        check_kv_fits(12, GIB // 4, host, kv_budget_mb=1)


def test_a_full_disk_mid_run_keeps_what_was_written_and_resumes(tmp_path, tiny_llama_dir):
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
    assert f"resuming {out}: 2 lines already written" in proc.stdout
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in final] == [f"r{i}" for i in range(6)]
    assert all(len(line["token_ids"]) == 3 for line in final)


def test_a_refused_final_rename_keeps_every_result_and_a_rerun_finishes_the_file(
        tmp_path, tiny_llama_dir):
    inp, out = _job(tmp_path), tmp_path / "out.jsonl"
    lines = inp.read_text().splitlines(keepends=True)
    # A bad line is written before any result, so the journal is not in input order.
    lines.insert(2, json.dumps({"id": "bad", "prompt_token_ids": [5], "max_tokens": 0}) + "\n")
    inp.write_text("".join(lines))
    want = ["r0", "r1", "bad", "r2", "r3", "r4", "r5"]
    flags = [f"--input={inp}", f"--output={out}", f"--model={tiny_llama_dir}",
             "--config.print_results=0"]
    proc = _run_batch(*flags, script=_RENAME_REFUSED)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"run_batch: writing the final {out} failed: [Errno 30] Read-only file system: "
            f"'{out}.tmp'; its 7 lines are kept as they were, and the same command finishes it"
            in proc.stderr), proc.stderr[-2000:]
    journal = out.read_bytes().splitlines()
    ids = [json.loads(line)["id"] for line in journal]
    assert sorted(ids) == sorted(want) and ids[0] == "bad"  # every result, as appended
    assert not (tmp_path / "out.jsonl.tmp").exists()
    assert not (tmp_path / "out.jsonl.lock").exists()
    proc = _run_batch(*flags)  # renaming works again
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming {out}: 7 lines already written" in proc.stdout
    assert "nothing was run" in proc.stdout
    final = out.read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in final] == want  # each id once, in input order
    assert sorted(final) == sorted(journal)  # the very lines written before, none run again
    assert not (tmp_path / "out.jsonl.tmp").exists()


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
