"""A truncated or corrupted newest checkpoint: resume from the previous intact one, one warning line, same outputs.

A run interrupted at step 27 holds the checkpoints of steps 16, 20 and 24 (3 kept). The newest (or the
two newest) is damaged the ways a disk or a copy damages files; the rerun of the same command must print
exactly one warning line naming the skipped file(s) and the checkpoint it resumes from, and finish with
the uninterrupted run's outputs. When no checkpoint is intact the rerun fails with one ``error:`` line
naming the fix (exit 2) and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import assert_same_as_reference, run_cli

import biollm_cls.train as train_module
from biollm_cls.checkpoint import checkpoint_problem, digest_path, list_checkpoints, save_checkpoint


def interrupted(tmp_path: Path) -> Path:
    """A run interrupted in step 27 (a run directory cannot be copied: its config names its path)."""
    out = tmp_path / "run"
    real = train_module.remember

    def remember(*args, **kwargs):
        if args[-1] == 27:
            raise KeyboardInterrupt  # an interrupted process (the checkpoint of step 24 is the newest)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "remember", remember)
        with pytest.raises(KeyboardInterrupt):
            run_cli(out)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000016.pt", "step_0000020.pt", "step_0000024.pt"]
    return out


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip_middle_byte(path: Path) -> None:  # torch's zip reader would load this silently (no CRC check)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint\n" * 100)


def truncate_without_digest(path: Path) -> None:  # a checkpoint from before digests existed, torn
    digest_path(path).unlink()
    path.write_bytes(path.read_bytes()[:1000])


def bad_digest_record(path: Path) -> None:
    digest_path(path).write_text("zzz\n")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated-half": truncate_half, "empty-file": empty, "flipped-byte": flip_middle_byte, "garbage": garbage,
    "truncated-no-digest": truncate_without_digest, "unreadable-digest": bad_digest_record,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_one_warning(damage, reference, tmp_path, capfd):
    out = interrupted(tmp_path)
    DAMAGE[damage](out / "checkpoints" / "step_0000024.pt")
    capfd.readouterr()
    assert run_cli(out) == 0
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("warning: skipped step_0000024.pt") and "resuming from" in err[0]
    assert "step_0000020.pt (step 20)" in err[0]
    assert_same_as_reference(out, reference)


def test_two_damaged_checkpoints_are_reported_in_one_line(reference, tmp_path, capfd):
    out = interrupted(tmp_path)
    truncate_half(out / "checkpoints" / "step_0000024.pt")
    flip_middle_byte(out / "checkpoints" / "step_0000020.pt")
    capfd.readouterr()
    assert run_cli(out) == 0
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "step_0000024.pt" in err[0] and "step_0000020.pt" in err[0], err
    assert "step_0000016.pt (step 16)" in err[0]
    assert_same_as_reference(out, reference)


def test_no_intact_checkpoint_is_one_error_line_and_writes_nothing(tmp_path, capfd):
    out = interrupted(tmp_path)
    for path in list_checkpoints(out):
        truncate_half(path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert run_cli(out) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: no intact checkpoint in") and "delete" in err[0]
    assert all(name in err[0] for name in ("step_0000016.pt", "step_0000020.pt", "step_0000024.pt"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing removed


# ---- the write protocol ------------------------------------------------------------------------------


def test_checkpoint_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import biollm_cls.checkpoint as checkpoint

    events: list[str] = []
    real_fsync, real_replace = checkpoint.os.fsync, checkpoint.os.replace

    def fsync(fd):
        import os

        target = os.readlink(f"/proc/self/fd/{fd}") if Path(f"/proc/self/fd/{fd}").exists() else "?"
        events.append(f"fsync {Path(target).name}")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename {Path(src).name} -> {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    save_checkpoint({"step": 3, "w": [1.0]}, tmp_path, 3, keep_last=2)
    assert events == ["fsync step_0000003.pt.tmp", "fsync step_0000003.pt.sha256.tmp",
                      "rename step_0000003.pt.sha256.tmp -> step_0000003.pt.sha256",
                      "rename step_0000003.pt.tmp -> step_0000003.pt", "fsync checkpoints"]
    assert checkpoint_problem(tmp_path / "checkpoints" / "step_0000003.pt") is None


def test_resaving_a_step_keeps_both_files_verifiable_until_the_rename(tmp_path, monkeypatch):
    import biollm_cls.checkpoint as checkpoint

    old = save_checkpoint({"step": 5, "w": [1.0]}, tmp_path, 5, keep_last=2)
    old_bytes = old.read_bytes()
    seen = []
    real_replace = checkpoint.os.replace

    def replace(src, dst):
        if Path(dst) == old:  # the instant before the new file takes the name: the old one must still verify
            seen.append(checkpoint_problem(old))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    save_checkpoint({"step": 5, "w": [2.0]}, tmp_path, 5, keep_last=2)
    assert seen == [None] and old.read_bytes() != old_bytes
    assert checkpoint_problem(old) is None and len(checkpoint.recorded_digests(old)) == 1
