"""Output lines in both shapes, and the journal surviving a killed run."""

import errno
import json
import os
import subprocess
import sys

import pytest

from batchjax.engine.results import (OutputInUseError, Result, ResultsJournal, error_result,
                                     to_output_line)
from batchjax.requests import InputFormat, RequestError


def _result(i: int) -> Result:
    return Result(id=f"r{i}", index=i, text=f"answer {i} é", token_ids=(i, i + 1, 2),
                  finish_reason="stop", prompt_tokens=10 + i, completion_tokens=3,
                  cached_prompt_tokens=4, error=None)


_BAD = RequestError(line=7, id=None, field="max_tokens", message="must be an integer >= 1")


def test_native_lines_hold_text_tokens_reason_and_usage():
    assert to_output_line(_result(1), InputFormat.NATIVE) == {
        "id": "r1", "text": "answer 1 é", "token_ids": [1, 2, 2], "finish_reason": "stop",
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "cached_prompt_tokens": 4},
    }
    assert to_output_line(error_result(_BAD), InputFormat.NATIVE) == {
        "id": "line-7", "error": {"message": "must be an integer >= 1", "field": "max_tokens"},
    }
    no_field = RequestError(line=3, id="x", field=None, message="invalid JSON")
    assert to_output_line(error_result(no_field), InputFormat.NATIVE) == {
        "id": "x", "error": {"message": "invalid JSON"}}


def test_openai_lines_follow_the_batch_output_shape():
    chat = to_output_line(_result(1), InputFormat.OPENAI_CHAT, model="smollm2-135m")
    assert chat["custom_id"] == "r1" and chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "answer 1 é"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 14
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    completion = to_output_line(_result(1), InputFormat.OPENAI_COMPLETIONS)["response"]["body"]
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "answer 1 é"
    failed = to_output_line(error_result(_BAD), InputFormat.OPENAI_CHAT)
    assert failed["custom_id"] == "line-7" and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["param"] == "max_tokens"
    # Ids derive from the request id: a rerun writes the same bytes.
    again = to_output_line(_result(1), InputFormat.OPENAI_CHAT)
    assert again == to_output_line(_result(1), InputFormat.OPENAI_CHAT)


@pytest.mark.parametrize("fmt", [InputFormat.NATIVE, InputFormat.OPENAI_CHAT])
def test_a_killed_run_resumes_to_the_same_file_as_an_uninterrupted_one(tmp_path, fmt):
    results = [_result(i) for i in range(6)] + [error_result(_BAD)]
    # Requests finish out of input order; the final file is in input order.
    finish_order = [3, 0, 6, 5, 1, 4, 2]
    input_order = [r.id for r in results]

    clean = tmp_path / "clean.jsonl"
    with ResultsJournal(clean, fmt) as journal:
        for i in finish_order:
            journal.append(results[i])
        journal.finalize(input_order)

    crashed = tmp_path / "crashed.jsonl"
    with ResultsJournal(crashed, fmt) as journal:
        for i in finish_order[:3]:
            journal.append(results[i])
    torn = json.dumps(to_output_line(results[finish_order[3]], fmt)).encode()[:25]
    with open(crashed, "ab") as f:
        f.write(torn)  # the kill landed in the middle of a write

    with ResultsJournal(crashed, fmt) as journal:
        assert journal.finished_ids == {results[i].id for i in finish_order[:3]}
        for i in finish_order[3:]:
            journal.append(results[i])
        journal.finalize(input_order)

    assert crashed.read_bytes() == clean.read_bytes()
    lines = [json.loads(line) for line in clean.read_text().splitlines()]
    key = "custom_id" if fmt.is_openai else "id"
    assert [line[key] for line in lines] == input_order


def test_a_complete_line_without_its_newline_is_run_again(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(to_output_line(_result(0), InputFormat.NATIVE)) + "\n"
                    + json.dumps(to_output_line(_result(1), InputFormat.NATIVE)))
    with ResultsJournal(path, InputFormat.NATIVE) as journal:
        assert journal.finished_ids == {"r0"}
    assert path.read_text().count("\n") == 1 and "r1" not in path.read_text()


def test_damage_before_the_last_line_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("{not json\n" + json.dumps(to_output_line(_result(0), InputFormat.NATIVE)) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        ResultsJournal(path, InputFormat.NATIVE)


def test_finalize_demands_every_id_and_appending_twice_fails(tmp_path):
    with ResultsJournal(tmp_path / "out.jsonl", InputFormat.NATIVE) as journal:
        journal.append(_result(0))
        with pytest.raises(ValueError, match="already"):
            journal.append(_result(0))
        with pytest.raises(ValueError, match="no result"):
            journal.finalize(["r0", "r1"])
        journal.append(_result(1))
        with pytest.raises(ValueError, match="repeats"):
            journal.finalize(["r1", "r0", "r1"])
        journal.append(_result(2))  # an id the input no longer holds
        journal.finalize(["r1", "r0"])
        assert journal.finished_ids == {"r0", "r1"}
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r1", "r0"]


def _refuse_renaming_tmp(monkeypatch):
    """Makes the rename of any `.tmp` file fail as a disk that went read-only would."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.fspath(src).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_refused_final_rename_keeps_the_journal_and_removes_its_copy(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    journal = ResultsJournal(path, InputFormat.NATIVE)
    for i in (2, 0, 1):
        journal.append(_result(i))
    written = path.read_bytes()
    _refuse_renaming_tmp(monkeypatch)
    with pytest.raises(OSError, match="Read-only file system"):
        journal.finalize(["r0", "r1", "r2"])
    assert path.read_bytes() == written  # every result, as it was
    assert not (tmp_path / "out.jsonl.tmp").exists()
    # The journal goes on: it still appends, and finalizes once renaming works again.
    monkeypatch.undo()
    journal.append(_result(3))
    journal.finalize(["r0", "r1", "r2", "r3"])
    journal.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [
        "r0", "r1", "r2", "r3"]


def test_a_rerun_after_a_refused_rename_finishes_the_file(tmp_path, monkeypatch):
    clean = tmp_path / "clean.jsonl"
    with ResultsJournal(clean, InputFormat.NATIVE) as journal:
        for i in range(3):
            journal.append(_result(i))
        journal.finalize(["r0", "r1", "r2"])
    path = tmp_path / "out.jsonl"
    _refuse_renaming_tmp(monkeypatch)
    with ResultsJournal(path, InputFormat.NATIVE) as journal:
        for i in (2, 0, 1):
            journal.append(_result(i))
        with pytest.raises(OSError):
            journal.finalize(["r0", "r1", "r2"])
    monkeypatch.undo()
    with ResultsJournal(path, InputFormat.NATIVE) as journal:  # the same command again
        assert journal.finished_ids == {"r0", "r1", "r2"}
        journal.finalize(["r0", "r1", "r2"])
    assert path.read_bytes() == clean.read_bytes()


def test_a_failed_directory_fsync_raises_and_leaves_the_final_file(tmp_path, monkeypatch):
    """The rename is done when the directory's fsync fails: the output is already the final
    file (input order, no `.tmp` left), the journal follows it, and the error is raised rather
    than swallowed, since the rename may not survive a power loss; finalizing again completes."""
    path = tmp_path / "out.jsonl"
    journal = ResultsJournal(path, InputFormat.NATIVE)
    for i in (2, 0, 1, 3):  # r3: an id the input no longer holds
        journal.append(_result(i))
    real_open, real_fsync, dir_fds = os.open, os.fsync, []

    def open_(file, flags, *args, **kwargs):
        fd = real_open(file, flags, *args, **kwargs)
        if os.path.isdir(file):
            dir_fds.append(fd)
        return fd

    def fsync(fd):  # the files' fsyncs go through; only a directory's fails
        if fd in dir_fds:
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        journal.finalize(["r0", "r1", "r2"])
    assert len(dir_fds) == 1
    with pytest.raises(OSError, match="Bad file descriptor"):  # closed, not leaked
        os.fstat(dir_fds[0])
    monkeypatch.undo()
    final = path.read_bytes()
    assert [json.loads(line)["id"] for line in final.splitlines()] == ["r0", "r1", "r2"]
    assert not (tmp_path / "out.jsonl.tmp").exists()
    assert journal.finished_ids == {"r0", "r1", "r2"}
    journal.finalize(["r0", "r1", "r2"])
    journal.close()
    assert path.read_bytes() == final


class _DiskFullAfter:
    """A raw file that takes `room` more bytes and then fails as a full disk does, having
    written part of the line it was given."""

    def __init__(self, raw, room):
        self._raw, self.room = raw, room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = self._raw.write(data[: self.room])
        self.room -= taken
        return taken

    def __getattr__(self, name):
        return getattr(self._raw, name)


def test_a_line_cut_short_by_a_full_disk_is_removed_and_written_again(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultsJournal(path, InputFormat.NATIVE) as journal:
        journal.append(_result(0))
        whole = path.read_bytes()
        journal._file = _DiskFullAfter(journal._file, room=20)  # part of the next line fits
        with pytest.raises(OSError, match="No space left"):
            journal.append(_result(1))
        assert path.read_bytes() == whole  # no torn line left for a later append to follow
        assert journal.finished_ids == {"r0"}
        journal._file.room = 10**6  # room again
        journal.append(_result(1))
    with ResultsJournal(path, InputFormat.NATIVE) as journal:
        assert journal.finished_ids == {"r0", "r1"}
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["r0", "r1"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLD_LOCK = """
import sys, time
from batchjax.engine.results import ResultsJournal
from batchjax.requests import InputFormat
journal = ResultsJournal(sys.argv[1], InputFormat.NATIVE)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "out.jsonl"
    first = ResultsJournal(out, InputFormat.NATIVE)
    assert (tmp_path / "out.jsonl.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(OutputInUseError, match=f"process {os.getpid()}"):
        ResultsJournal(out, InputFormat.NATIVE)
    first.append(_result(0))
    first.close()
    assert not (tmp_path / "out.jsonl.lock").exists()
    with ResultsJournal(out, InputFormat.NATIVE) as again:  # free once the first has closed
        assert again.finished_ids == {"r0"}


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path):
    out = tmp_path / "out.jsonl"
    child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError, match=f"process {child.pid}"):
            ResultsJournal(out, InputFormat.NATIVE)
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / "out.jsonl.lock").exists()  # a SIGKILL leaves the file behind
    with ResultsJournal(out, InputFormat.NATIVE) as journal:
        assert (tmp_path / "out.jsonl.lock").read_text().strip() == str(os.getpid())
        assert journal.finished_ids == frozenset()


def test_run_batch_refuses_an_output_another_run_is_writing(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt_token_ids": [1, 2]}) + "\n")
    with ResultsJournal(out, InputFormat.NATIVE):
        proc = subprocess.run([sys.executable, "-m", "experiments.run_batch", f"--input={inp}",
                               f"--output={out}", "--model=unused"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"another run (process {os.getpid()}) is writing this output" in proc.stderr
    assert out.read_bytes() == b""  # nothing written by the refused run
