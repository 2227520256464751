"""``train --restart-stale`` (what the pipeline's train rule runs): resume what this command can resume, start
over what it cannot, and never delete a folder that holds no run.

An interrupted run of the same config, library and inputs resumes (one ``note: resuming`` line) to the
uninterrupted run's outputs. A directory this command cannot resume — a run of another config, of another
library commit, older than an input file, a completed run (summary.json, or run_metadata.json "complete" with
summary.json removed, as Snakemake does before a forced rerun), no checkpoint, or no intact checkpoint — is
deleted with one ``note: starting ... over: <why>`` line, and the run that follows is the uninterrupted one.
Without the flag these directories are refused (tests/test_bad_inputs.py, rows 29-32 of docs/run_outputs.md).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import TINY, assert_same_as_reference, run_cli

import biollm_cls.train as train_module
from biollm_cls.checkpoint import list_checkpoints
from biollm_cls.cli import main as cli_main


def restart_stale(out: Path, *extra: str) -> int:
    return cli_main(["train", "--restart-stale", *TINY, *extra, f"logging.output_dir={out}"])


def interrupted(out: Path, *extra: str, at: int = 17) -> Path:
    """`out` after a run killed in step `at` (checkpoints of steps 10, 12, 16 with at=17)."""
    real = train_module.remember

    def remember(*args, **kwargs):
        if args[-1] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "remember", remember)
        with pytest.raises(KeyboardInterrupt):
            cli_main(["train", *TINY, *extra, f"logging.output_dir={out}"])
    assert not (out / "summary.json").exists()
    return out


def test_an_interrupted_run_resumes(reference, tmp_path, capfd):
    out = interrupted(tmp_path / "run")
    capfd.readouterr()
    assert restart_stale(out) == 0
    assert capfd.readouterr().err.splitlines() == [
        f"note: resuming {out} from step_0000016.pt (step 16 of 30); the steps after it are recomputed"]
    assert_same_as_reference(out, reference)


def _completed(out: Path) -> None:
    assert run_cli(out) == 0


def _forced(out: Path) -> None:  # what Snakemake leaves of a completed run before rerunning it
    _completed(out)
    for name in ("summary.json", "task_matrix.csv"):
        (out / name).unlink()


def _another_library(out: Path) -> None:
    interrupted(out)
    meta = json.loads((out / "run_metadata.json").read_text())
    meta["library"]["version"] = "0.0.0.other"  # (a git_commit differing from this checkout's says the same)
    (out / "run_metadata.json").write_text(json.dumps(meta))


def _no_checkpoint(out: Path) -> None:
    interrupted(out, at=3)
    assert not list_checkpoints(out)


def _no_intact_checkpoint(out: Path) -> None:
    interrupted(out)
    for path in list_checkpoints(out):
        path.write_bytes(path.read_bytes()[:100])


STALE: dict[str, tuple[Callable[[Path], None], str]] = {
    "another-config": (lambda out: interrupted(out, "seed=7"), "its config differs in: seed"),
    "completed": (_completed, "it holds a completed run (summary.json)"),
    "forced-rerun": (_forced, "its run completed (run_metadata.json) and summary.json was removed"),
    "another-library": (_another_library, "it was started by another library version (0.0.0.other; this is "),
    "no-checkpoint": (_no_checkpoint, "it holds no checkpoint to resume from"),
    "no-intact-checkpoint": (_no_intact_checkpoint, "none of its checkpoints is intact"),
}


@pytest.mark.parametrize("case", list(STALE))
def test_a_stale_run_directory_starts_over(case, reference, tmp_path, capfd):
    make, why = STALE[case]
    out = tmp_path / "run"
    make(out)
    capfd.readouterr()
    assert restart_stale(out) == 0
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: starting {out} over: {why}"), err
    assert_same_as_reference(out, reference)


def test_an_input_newer_than_the_run_starts_it_over(reference, tmp_path, capfd):
    plan = tmp_path / "plan.json"  # the matched baseline's input: the learner run's summary.json
    shutil.copy(reference / "summary.json", plan)
    matched = ["ablation=er_matched", f"consolidation.sleep_plan={plan}"]
    out = interrupted(tmp_path / "run", *matched)
    later = (out / "validated_config.json").stat().st_mtime + 60
    os.utime(plan, (later, later))  # the learner run was redone after this run started
    capfd.readouterr()
    assert restart_stale(out, *matched) == 0
    err = capfd.readouterr().err.splitlines()
    assert err == [f"note: starting {out} over: an input changed after it started ({plan})"], err
    fresh = tmp_path / "fresh"
    assert cli_main(["train", *TINY, *matched, f"logging.output_dir={fresh}"]) == 0
    assert (out / "summary.json").read_text() == (fresh / "summary.json").read_text()


def test_a_folder_without_a_run_is_never_deleted(tmp_path, capfd):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious\n")
    capfd.readouterr()
    assert restart_stale(out) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out} is not empty and holds no run"), err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
