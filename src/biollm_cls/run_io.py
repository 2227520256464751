"""The run directory: metrics.jsonl, summary.json, task_matrix.csv, config, metadata (docs/run_outputs.md).

Every file except the streaming ``metrics.jsonl`` is written atomically (temp file + ``os.replace``), and
``summary.json`` is written last, so its presence means the run completed. ``metrics.jsonl`` is opened
fresh for a new run; on resume it is cut back to the rows of the checkpointed steps first.
"""

from __future__ import annotations

import csv
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


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
        if resume_step is None:
            self.file = path.open("w", encoding="utf-8")
        else:
            kept = [line for line in _read_lines(path) if _row_step(line) <= resume_step]
            atomic_write_text(path, "".join(kept))
            self.file = path.open("a", encoding="utf-8")

    def log(self, row: dict) -> None:
        row = _json_safe(row)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        for mirror in self.mirrors:
            mirror.log(row)

    def close(self) -> None:
        self.file.close()


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
