"""A full disk under the run directory: one error line, exit code 2, the files written before intact.

The write that fails is patched to raise ``OSError(ENOSPC)`` (after writing part of its data where that
is possible): a checkpoint, a metrics.jsonl row, summary.json (the last file of a run) and the first file
of a run. Each time the CLI prints exactly one ``error:`` line naming the file and the fix and returns 2;
no temp file is left; every file written before still reads back (checkpoints verify against their
digests); and once space is back, the same command resumes and produces the uninterrupted run's outputs.
One case runs as a real process, for its exit status.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from faultkit import assert_quiet_rerun, assert_same_as_reference, driver_command, driver_env, run_cli

import biollm_cls.run_io as run_io
from biollm_cls.checkpoint import checkpoint_problem, list_checkpoints, load_checkpoint

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module", autouse=True)
def process_case(tmp_path_factory, warm_driver):
    """The checkpoint case as a real `train` process, started first so it runs beside the in-process cases."""
    out = tmp_path_factory.mktemp("enospc_process") / "run"
    proc = subprocess.Popen(driver_command({"point": "enospc_checkpoint", "call": 4, "fraction": 0.3}, out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=driver_env())
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_intact(out: Path) -> None:
    """Every file of the run directory reads back; checkpoints verify; no temp files; no summary.json."""
    assert not (out / "summary.json").exists()
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")], "temp files left behind"
    for name in ("validated_config.json", "run_metadata.json"):
        json.loads((out / name).read_text())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    for path in list_checkpoints(out):
        assert checkpoint_problem(path) is None, path
        load_checkpoint(path, "cpu")


def one_error_line(capfd, *needles: str) -> str:
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: cannot write ") and "No space left on device (ENOSPC)" in line, line
    assert "free space" in line and "rerun the same command" in line, line
    for needle in needles:
        assert needle in line, line
    return line


def resumes_identically(out: Path, reference: Path, capfd) -> None:
    capfd.readouterr()
    assert run_cli(out) == 0
    assert_quiet_rerun(capfd.readouterr().err)
    assert_same_as_reference(out, reference)


def test_full_disk_during_a_checkpoint(tmp_path, reference, capfd, monkeypatch):
    import torch

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the checkpoint of step 16: half its bytes, then the disk is full
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise ENOSPC
        return real(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save)
    capfd.readouterr()
    assert run_cli(out) == 2
    one_error_line(capfd, "step_0000016.pt.tmp", "logging.output_dir")
    assert_intact(out)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000008.pt", "step_0000010.pt", "step_0000012.pt"]
    monkeypatch.setattr(torch, "save", real)
    resumes_identically(out, reference, capfd)


class FullAfter:
    """A text file whose writes fail with ENOSPC after `rows` successful ones."""

    def __init__(self, file, rows: int):
        self.file, self.rows = file, rows

    def write(self, text: str) -> int:
        if self.rows <= 0:
            raise ENOSPC
        self.rows -= 1
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_full_disk_while_logging_metrics(tmp_path, reference, capfd, monkeypatch):
    real_init = run_io.MetricsLog.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.file = FullAfter(self.file, rows=19)  # the runtime row, then steps 1-18

    out = tmp_path / "run"
    monkeypatch.setattr(run_io.MetricsLog, "__init__", init)
    capfd.readouterr()
    assert run_cli(out) == 2
    one_error_line(capfd, "metrics.jsonl")
    assert_intact(out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 19
    monkeypatch.setattr(run_io.MetricsLog, "__init__", real_init)
    resumes_identically(out, reference, capfd)


def _fdopen_full_for(prefix: str, monkeypatch) -> None:
    """os.fdopen of run_io's temp files whose name starts with `prefix`: the write fails with ENOSPC."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        handle = real(fd, *args, **kwargs)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(prefix):
            return FullAfter(handle, rows=0)
        return handle

    monkeypatch.setattr(run_io.os, "fdopen", fdopen)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being written")
def test_full_disk_writing_summary_json(tmp_path, reference, capfd, monkeypatch):
    out = tmp_path / "run"
    _fdopen_full_for(".summary.json.", monkeypatch)
    capfd.readouterr()
    assert run_cli(out) == 2
    one_error_line(capfd, "summary.json")
    assert_intact(out)
    assert (out / "task_matrix.csv").read_text() == (reference / "task_matrix.csv").read_text()
    monkeypatch.undo()
    resumes_identically(out, reference, capfd)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being written")
def test_full_disk_at_the_first_file(tmp_path, reference, capfd, monkeypatch):
    out = tmp_path / "run"
    _fdopen_full_for(".validated_config.json.", monkeypatch)
    capfd.readouterr()
    assert run_cli(out) == 2
    one_error_line(capfd, "validated_config.json")
    assert [p.name for p in out.iterdir()] == []  # nothing half-written
    monkeypatch.undo()
    resumes_identically(out, reference, capfd)


def test_full_disk_in_a_real_process_exits_2(process_case, reference, capfd):
    out, proc = process_case
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "step_0000012.pt.tmp" in lines[0] and "ENOSPC" in lines[0], lines
    assert_intact(out)
    resumes_identically(out, reference, capfd)
