"""The run directory: metrics.jsonl, summary.json, task_matrix.csv, config, metadata (docs/run_outputs.md).

Every file except the streaming ``metrics.jsonl`` is written atomically (temp file, ``fsync``,
``os.replace``, ``fsync`` of the folder), and ``summary.json`` is written last, so its presence means the
run completed. ``metrics.jsonl`` is opened fresh for a new run; on resume it is cut back to the rows of
the checkpointed steps first. A write the disk refuses (full, quota, read-only) raises ``OutputWriteError``:
one line naming the file and the fix; the files written before it are left as they were.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import biollm_cls

TASK_MATRIX_COLUMNS = ["boundary_index", "boundary_step", "view", "task_id", "task_name", "token_acc", "loss",
                       "n_tokens", "exact_match"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class Mirror(Protocol):
    """Something that mirrors metrics rows elsewhere (W&B); failures must not raise."""

    def log(self, row: dict) -> None: ...


_FIXES = {
    errno.ENOSPC: "free space on that filesystem (or choose another logging.output_dir)",
    errno.EDQUOT: "free space within your quota (or choose another logging.output_dir)",
    errno.EROFS: "the filesystem is read-only: choose another logging.output_dir",
    errno.EACCES: "make the directory writable (or choose another logging.output_dir)",
    errno.EPERM: "make the directory writable (or choose another logging.output_dir)",
}


class OutputWriteError(RuntimeError):
    """A run output the disk refused to write (reported as one line, exit code 2)."""

    @classmethod
    def of(cls, path: Path | str, exc: OSError) -> OutputWriteError:
        reason = exc.strerror or str(exc) or type(exc).__name__
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        fix = _FIXES.get(exc.errno, "check the disk (or choose another logging.output_dir)")
        return cls(f"cannot write {path}: {reason}{f' ({code})' if code else ''}; {fix}, then rerun the same "
                   f"command: a run resumes from its last checkpoint, and files written before are intact")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` via a synced temp file and a rename. Raises OutputWriteError; never leaves a temp file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputWriteError.of(path, exc) from None
        raise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _json_safe(value.item())
    return value


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


class MetricsLog:
    """metrics.jsonl, one JSON object per line, flushed per row and forwarded to mirrors."""

    def __init__(self, path: Path, resume_step: int | None, mirrors: list[Mirror] | None = None):
        self.path = path
        self.mirrors = mirrors or []
        self.failed = False
        if resume_step is not None:
            kept = [line for line in _read_lines(path) if _row_step(line) <= resume_step]
            atomic_write_text(path, "".join(kept))
        try:
            self.file = path.open("w" if resume_step is None else "a", encoding="utf-8")
        except OSError as exc:
            raise OutputWriteError.of(path, exc) from None

    def log(self, row: dict) -> None:
        row = _json_safe(row)
        try:
            self.file.write(json.dumps(row, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as exc:  # a torn last line is dropped on resume (_row_step)
            self.failed = True
            raise OutputWriteError.of(self.path, exc) from None
        for mirror in self.mirrors:
            mirror.log(row)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as exc:
            if not self.failed:  # after a failed write the buffer cannot be flushed either: already reported
                raise OutputWriteError.of(self.path, exc) from None


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []


def _row_step(line: str) -> float:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a torn last line from a killed process is dropped
    return math.inf if row.get("kind") == "summary" else row.get("step", math.inf)


def write_task_matrix(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TASK_MATRIX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k])
                         for k in TASK_MATRIX_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def library_commit() -> dict[str, Any]:
    """Git commit of the library's own source tree (not the working directory); 'unknown' when installed."""
    here = Path(biollm_cls.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"biollm_cls": biollm_cls.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "numpy", "wandb", "hydra-core"):
        try:
            out[name] = metadata.version(name)  # no import: transformers/wandb take seconds to import
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
