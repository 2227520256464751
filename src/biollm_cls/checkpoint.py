"""Checkpoints that hold everything needed to continue a run, saved and loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (base, hippocampus with its
initial weights, both optimizers, the GradScaler, replay, EWC, scheduler, novelty tracker, metric
matrices, counters, RNG states, step), so ``torch.load(..., weights_only=True)`` can read it.

Writing (``save_checkpoint``), in this order, so that a process killed at any point (or a full disk)
never leaves a torn checkpoint under a checkpoint's name:

1. ``torch.save`` to ``step_XXXXXXX.pt.tmp``, flushed and ``fsync``-ed, its sha256 computed from the bytes
   as they are written (in a second thread, beside the write: the file is not read back);
2. the sha256 to ``step_XXXXXXX.pt.sha256`` (``sha256sum -c`` format; temp file, fsync, rename). When
   the step is saved again, the digest file lists the old
   and the new digest until the new file is in place, so either file verifies at every instant;
3. ``os.replace`` of the temp file onto ``step_XXXXXXX.pt``, then ``fsync`` of the folder;
4. older checkpoints beyond ``keep_last`` (and stale temp files) are removed.

Reading (``load_latest_checkpoint``): the newest checkpoint whose bytes match its recorded sha256 and
that ``torch.load`` reads. A corrupted or truncated newest checkpoint does not block a resume: the
previous intact one is used, with ONE warning line on stderr; when none is intact the error is one
line (``CheckpointError``). A checkpoint without a ``.sha256`` file (written before digests existed)
is trusted when it loads. Torch's zip reader does not verify CRCs, so without the digest a flipped
byte in a tensor would load silently.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from biollm_cls.run_io import OutputWriteError, file_sha256, fsync_dir

_PATTERN = re.compile(r"step_(\d{7})\.pt$")
DIGEST_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory can be resumed from (one line naming the files and the fix)."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}.pt"


def checkpoint_step(path: Path) -> int:
    match = _PATTERN.search(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint file name (step_XXXXXXX.pt)")
    return int(match.group(1))


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PATTERN.search(p.name))


class _HashingWriter:
    """A write-only binary file that also feeds every byte to a sha256, in a second thread while the file
    write runs (hashlib and file writes both release the GIL for large buffers): the digest costs about
    nothing beside the write, where reading the file back cost more than writing it (bench/README.md:
    7.2 s of a 13.4 s checkpoint at 8.2 GB). Each `write` waits for its hash, as its buffer is only lent."""

    def __init__(self, handle, pool):
        self.handle, self.pool, self.digest = handle, pool, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes < 1 << 20:  # small records: not worth a thread hop
            self.digest.update(view)
            return self.handle.write(view)
        hashing = self.pool.submit(self.digest.update, view)
        try:
            return self.handle.write(view)
        finally:
            hashing.result()

    def flush(self) -> None:
        self.handle.flush()


def _save_hashed(state: dict, path: Path) -> str:
    """torch.save `state` to `path` (flushed, fsync-ed); returns the file's sha256."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sha256") as pool:
        box: list[_HashingWriter] = []

        def write(handle) -> None:
            box.append(_HashingWriter(handle, pool))
            torch.save(state, box[0])

        _write_synced(path, write)
    return box[0].digest.hexdigest()


def _write_synced(path: Path, write: Callable) -> None:
    """Create `path` with `write(handle)`, flushed and fsync-ed before it is closed."""
    with path.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(state: dict, run_dir: Path, step: int, keep_last: int) -> Path:
    """Write the checkpoint of `step` (see the module docstring); returns its path.

    Raises OutputWriteError (one line) when the disk refuses the write; the previous checkpoints are
    untouched and no temp file is left behind."""
    path = checkpoint_path(run_dir, step)
    tmp, digest_file = path.with_suffix(".pt.tmp"), digest_path(path)
    digest_tmp = digest_file.with_suffix(".sha256.tmp")
    writing = tmp
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = _save_hashed(state, tmp)
        writing = digest_file
        if path.exists():  # saved again: both files must verify until the rename (a legacy file: its own hash)
            old = [d for d in (recorded_digests(path) or [file_sha256(path)]) if d != new]
        else:
            old = []
        _write_digests(digest_file, digest_tmp, path.name, [new, *old])
        writing = path
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old:
            writing = digest_file
            _write_digests(digest_file, digest_tmp, path.name, [new])
    except BaseException as exc:
        for leftover in (tmp, digest_tmp):
            leftover.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputWriteError.of(writing, exc) from None
        raise
    _prune(run_dir, keep_last)
    return path


def _write_digests(digest_file: Path, tmp: Path, name: str, digests: list[str]) -> None:
    text = "".join(f"{d}  {name}\n" for d in digests).encode("ascii")
    _write_synced(tmp, lambda handle: handle.write(text))
    os.replace(tmp, digest_file)


def recorded_digests(path: Path) -> list[str]:
    """The sha256 digests `path` may have (its .sha256 file); [] when it has none."""
    record = digest_path(path)
    try:
        text = record.read_text(encoding="ascii") if record.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in text.splitlines() if re.fullmatch(r"[0-9a-f]{64}  \S+", line)]


def _prune(run_dir: Path, keep_last: int) -> None:
    """Remove checkpoints beyond the newest `keep_last`, their digests, and stale temp/digest files."""
    kept = list_checkpoints(run_dir)
    for old in kept[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
        digest_path(old).unlink(missing_ok=True)
    names = {p.name for p in list_checkpoints(run_dir)}
    for item in (run_dir / "checkpoints").iterdir():
        stale_tmp = item.name.endswith(".tmp")
        orphan_digest = item.name.endswith(DIGEST_SUFFIX) and item.name[: -len(DIGEST_SUFFIX)] not in names
        if stale_tmp or orphan_digest:
            item.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why the bytes of `path` are not the checkpoint that was written (None: they are, or no digest)."""
    if not digest_path(path).is_file():
        return None
    expected = recorded_digests(path)
    if not expected:
        return f"unreadable {digest_path(path).name}"
    if file_sha256(path) not in expected:
        return f"sha256 mismatch, truncated or corrupted ({path.stat().st_size} bytes)"
    return None


def _read(path: Path, device: torch.device) -> tuple[dict | None, str | None]:
    problem = checkpoint_problem(path)
    if problem is not None:
        return None, problem
    try:
        state = load_checkpoint(path, device)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, UnicodeDecodeError, ...
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        return None, f"unreadable ({type(exc).__name__}{': ' + first[:80] if first else ''})"
    if not isinstance(state, dict) or state.get("step") != checkpoint_step(path):
        return None, f"holds step {state.get('step') if isinstance(state, dict) else '?'}, not the one its name says"
    return state, None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_latest_checkpoint(run_dir: Path, device: torch.device,
                           warn: Callable[[str], None] = _warn) -> tuple[Path, dict]:
    """(path, state) of the newest intact checkpoint of `run_dir`.

    Skipped (corrupted, truncated, unreadable) newer checkpoints are reported in ONE `warn` line.
    Raises CheckpointError when the run directory holds checkpoints but none is intact."""
    checkpoints = list_checkpoints(run_dir)
    skipped: list[str] = []
    for path in reversed(checkpoints):
        state, problem = _read(path, device)
        if state is not None:
            if skipped:
                warn(f"skipped {'; '.join(skipped)} in {path.parent}; resuming from the previous intact "
                     f"checkpoint {path.name} (step {state['step']}), the steps after it are recomputed")
            return path, state
        skipped.append(f"{path.name}: {problem}")
    if not checkpoints:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint to resume from")
    raise CheckpointError(
        f"no intact checkpoint in {run_dir / 'checkpoints'} ({'; '.join(skipped)}); the run cannot resume: "
        f"delete {run_dir} to start it again, or choose another logging.output_dir")
