"""Build a continual instruction *pack*: the reference's NI8 selection, with its defects fixed.

A pack is a folder with ``train.jsonl`` and ``eval.jsonl`` (rows ``{"task", "instruction", "output"}``,
tasks in training order), an optional ``pretrain.jsonl`` (synthetic packs) and ``metadata.json`` (source,
library versions, the selected tasks in training order, per-task counts, row totals and the sha256 of
every file and of the task list).

Selection (deterministic in ``task_selection_seed``; the reference's procedure):
  1. clean every row: control characters become spaces, whitespace runs collapse, strip; the answer is
     the first non-empty output; rows with an empty task, instruction or answer are dropped;
  2. candidates = tasks with >= ``min_usable_per_task`` usable rows (distinct instructions), sorted,
     shuffled with ``random.Random(seed)``; the first ``num_tasks`` are the tasks, in training order;
  3. per task: a stable shuffle with ``random.Random(seed ^ int(sha256(task)[:16], 16))``, then
     duplicates of an instruction are dropped (first kept) *before* slicing, so eval and train never share
     an instruction (the reference did not deduplicate); eval = the first ``eval_per_task`` rows, train =
     the next ``train_per_task``.
With ``include_definition`` (default) the task definition is prepended to each instruction; the
reference dropped it, so a prompt did not say what to do.

Files are written to a temporary folder next to the output and renamed into place, so an error never
leaves a half-written pack. ``verify_pack`` re-computes the checksums; the instruction stream calls it
before training on a pack.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import random
import re
import shutil
import sys
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.packs.sources import RawRow, Source, read_utf8
from biollm_cls.run_io import file_sha256

PACK_FORMAT = "biollm-cls-pack/1"
METADATA = "metadata.json"
# file name -> checksum key in metadata.json (the reference's key names)
CHECKSUM_KEYS = {"train.jsonl": "train_jsonl_sha256", "eval.jsonl": "eval_jsonl_sha256",
                 "pretrain.jsonl": "pretrain_jsonl_sha256"}


@dataclass(frozen=True)
class BuildOptions:
    num_tasks: int = 8
    task_selection_seed: int = 42
    min_usable_per_task: int = 700
    train_per_task: int = 500
    eval_per_task: int = 200
    include_definition: bool = True

    def check(self) -> None:
        for key in ("num_tasks", "train_per_task", "eval_per_task", "min_usable_per_task"):
            if getattr(self, key) <= 0:
                raise DataError(f"--{key.replace('_', '-')}={getattr(self, key)} must be > 0")
        if self.min_usable_per_task < self.train_per_task + self.eval_per_task:
            raise DataError(
                f"--min-usable-per-task={self.min_usable_per_task} must be >= --train-per-task + --eval-per-task "
                f"= {self.train_per_task + self.eval_per_task} (a selected task must fill both slices)"
            )


@dataclass(frozen=True)
class CleanRow:
    instruction: str
    output: str
    definition: str


# ---- cleaning ----------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalize_text(value: Any) -> str:
    """Control characters -> spaces, whitespace runs -> one space, stripped. Non-strings -> ''."""
    if not isinstance(value, str):
        return ""
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in value)
    return _SPACES.sub(" ", text).strip()


def first_output(outputs: Any) -> str:
    """The first non-empty normalised answer of a string or a list of strings."""
    if isinstance(outputs, str):
        return normalize_text(outputs)
    if isinstance(outputs, list):
        return next((text for text in map(normalize_text, outputs) if text), "")
    return ""


def clean_rows(rows: Iterable[RawRow]) -> tuple[dict[str, list[CleanRow]], int, int]:
    """Group cleaned rows by task (source order kept). Returns (rows by task, rows read, rows dropped)."""
    by_task: dict[str, list[CleanRow]] = {}
    read = dropped = 0
    for raw in rows:
        read += 1
        task, instruction = normalize_text(raw.task), normalize_text(raw.instruction)
        output = first_output(raw.outputs)
        if not (task and instruction and output):
            dropped += 1
            continue
        by_task.setdefault(task, []).append(CleanRow(instruction, output, normalize_text(raw.definition)))
    return by_task, read, dropped


# ---- selection ---------------------------------------------------------------------------------------


def usable_count(rows: list[CleanRow]) -> int:
    """Usable rows of a task = distinct instructions (duplicates can never fill both slices)."""
    return len({row.instruction for row in rows})


def select_tasks(usable: dict[str, int], num_tasks: int, seed: int, min_usable: int) -> list[str]:
    """Tasks with >= min_usable rows, sorted, shuffled with Random(seed), first num_tasks (training order)."""
    candidates = sorted(task for task, n in usable.items() if n >= min_usable)
    if len(candidates) < num_tasks:
        raise DataError(
            f"only {len(candidates)} of {len(usable)} tasks have >= {min_usable} usable rows, "
            f"but {num_tasks} tasks were asked for (lower --min-usable-per-task or --num-tasks)"
        )
    random.Random(seed).shuffle(candidates)
    return candidates[:num_tasks]


def task_rng(seed: int, task: str) -> random.Random:
    """The per-task stable shuffle: Random(seed ^ int(sha256(task)[:16], 16))."""
    return random.Random(seed ^ int(hashlib.sha256(task.encode("utf-8")).hexdigest()[:16], 16))


def split_task(task: str, rows: list[CleanRow], options: BuildOptions) -> tuple[list[CleanRow], list[CleanRow], int]:
    """(eval rows, train rows, duplicates dropped): stable shuffle, dedupe by instruction, slice."""
    shuffled = list(rows)
    task_rng(options.task_selection_seed, task).shuffle(shuffled)
    seen: set[str] = set()
    unique: list[CleanRow] = []
    for row in shuffled:
        if row.instruction not in seen:
            seen.add(row.instruction)
            unique.append(row)
    n_eval, n_train = options.eval_per_task, options.train_per_task
    return unique[:n_eval], unique[n_eval:n_eval + n_train], len(shuffled) - len(unique)


def prompt_of(row: CleanRow, include_definition: bool) -> str:
    """The instruction a learner sees: the task definition (when included), a blank line, the input."""
    if include_definition and row.definition:
        return f"{row.definition}\n\n{row.instruction}"
    return row.instruction


# ---- building ----------------------------------------------------------------------------------------


def build_pack(source: Source, output_dir: Path, options: BuildOptions, progress: bool | None = None) -> dict:
    """Select, split and write a pack; returns its metadata. Raises DataError; writes nothing on error."""
    options.check()
    check_output_dir(output_dir)
    show = sys.stderr.isatty() if progress is None else progress
    rows = tqdm(source.rows, total=source.total, desc="reading rows", unit="row", disable=not show)
    by_task, read, dropped = clean_rows(rows)
    usable = {task: usable_count(task_rows) for task, task_rows in by_task.items()}
    tasks = select_tasks(usable, options.num_tasks, options.task_selection_seed, options.min_usable_per_task)
    files: dict[str, list[dict]] = {"train.jsonl": [], "eval.jsonl": []}
    counts: dict[str, dict[str, int]] = {}
    definitions: dict[str, str] = {}
    for task in tasks:
        eval_rows, train_rows, duplicates = split_task(task, by_task[task], options)
        for name, part in (("eval.jsonl", eval_rows), ("train.jsonl", train_rows)):
            files[name].extend(
                {"task": task, "instruction": prompt_of(r, options.include_definition), "output": r.output}
                for r in part
            )
        counts[task] = {"rows": len(by_task[task]), "usable": usable[task], "train": len(train_rows),
                        "eval": len(eval_rows), "duplicates_removed": duplicates}
        definitions[task] = by_task[task][0].definition
    files.update(source.extra_files)
    metadata = _metadata(source.info, options, tasks, counts, definitions, files, read, dropped, len(usable))
    return write_pack(output_dir, files, metadata)


def _metadata(info: dict, options: BuildOptions, tasks: list[str], counts: dict, definitions: dict,
              files: dict[str, list[dict]], read: int, dropped: int, tasks_seen: int) -> dict:
    from biollm_cls import __version__

    totals = {"rows_read": read, "rows_dropped_empty": dropped, "tasks_seen": tasks_seen,
              **{f"{name.split('.')[0]}_rows": len(rows) for name, rows in files.items()}}
    return {
        "format": PACK_FORMAT,
        "dataset_name": info.get("dataset_name"),
        "dataset_config": info.get("dataset_config"),
        "split": info.get("split"),
        "num_tasks": options.num_tasks,
        "task_selection_seed": options.task_selection_seed,
        "min_usable_per_task": options.min_usable_per_task,
        "train_per_task": options.train_per_task,
        "eval_per_task": options.eval_per_task,
        "include_definition": options.include_definition,
        "selected_tasks": tasks,  # training order
        "task_counts": counts,
        "task_definitions": definitions,
        "totals": totals,
        "source": {**info, "datasets_version": _version("datasets"), "biollm_cls_version": __version__,
                   "python_version": platform.python_version()},
        "checksums": {},  # filled by write_pack from the bytes written
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- writing (atomic) --------------------------------------------------------------------------------


def check_output_dir(output_dir: Path) -> None:
    """Refuse to replace a folder that is neither empty nor a pack (we never delete unknown files)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: exists and is not a directory; choose another --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / METADATA).is_file():
        raise DataError(f"{output_dir}: exists, is not empty and holds no {METADATA}; refusing to overwrite it: "
                        f"choose an empty --output-dir (or remove that folder)")


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows).encode("ascii")


def write_pack(output_dir: Path, files: dict[str, list[dict]], metadata: dict) -> dict:
    """Write every file and metadata.json (with checksums) to a temp folder, then rename it into place.

    Returns the metadata as written."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a pack is ordinary shared data
        checksums = {}
        for name, rows in files.items():
            data = _jsonl_bytes(rows)
            (tmp / name).write_bytes(data)
            checksums[CHECKSUM_KEYS[name]] = hashlib.sha256(data).hexdigest()
        checksums["task_list_sha256"] = task_list_sha256(metadata["selected_tasks"])
        metadata = {**metadata, "checksums": checksums}
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metadata


def _replace_dir(new: Path, dest: Path) -> None:
    if not dest.exists():
        new.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old-{new.name}")
    dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# ---- checksums ---------------------------------------------------------------------------------------


def task_list_sha256(tasks: list[str]) -> str:
    return hashlib.sha256("\n".join(tasks).encode("utf-8")).hexdigest()


def pack_dir(path: str | Path) -> Path:
    """The pack folder of a pack folder or of a file inside one."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def is_pack(path: str | Path) -> bool:
    """True when `path` is a pack folder or a file that sits next to a metadata.json."""
    return (pack_dir(path) / METADATA).is_file()


REBUILD = "rebuild the pack (build-pack)"
VERIFY_HINT = f"{REBUILD} or set benchmark.verify_checksums=false"


def read_metadata(path: str | Path) -> dict:
    file = pack_dir(path) / METADATA
    try:
        metadata = json.loads(read_utf8(file))
    except FileNotFoundError:
        raise DataError(f"{file}: no such file (not a pack)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg}); {REBUILD}") from None
    tasks = metadata.get("selected_tasks") if isinstance(metadata, dict) else None
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise DataError(f"{file}: not a pack's metadata (no 'selected_tasks' list of task names); {REBUILD}")
    seen: set[str] = set()
    for task in tasks:
        if task in seen:
            raise DataError(f"{file} (field 'selected_tasks'): task {task!r} is listed twice; task names must be "
                            f"unique: {REBUILD}")
        seen.add(task)
    return metadata


def verify_pack(path: str | Path) -> dict:
    """Check every checksum in metadata.json against the files; return the metadata. Raises DataError.

    A pack must carry a checksum for each of its data files and for its task list: a pack without them
    cannot be verified, so it is refused rather than recorded as verified."""
    folder = pack_dir(path)
    metadata = read_metadata(folder)
    checksums = metadata.get("checksums")
    hint = VERIFY_HINT
    if not isinstance(checksums, dict) or not checksums:
        raise DataError(f"{folder / METADATA}: records no checksums, so the pack cannot be verified; {hint} "
                        f"(it is then recorded as checksums_verified: false)")
    required = ["task_list_sha256"] + [key for name, key in CHECKSUM_KEYS.items() if (folder / name).is_file()]
    missing = [key for key in required if not isinstance(checksums.get(key), str)]
    if missing:
        raise DataError(f"{folder / METADATA}: records no checksum {', '.join(missing)}, so the pack cannot be "
                        f"verified; {hint}")
    for name, key in CHECKSUM_KEYS.items():
        if key not in checksums:
            continue
        file = folder / name
        if not file.is_file():
            raise DataError(f"{file}: listed in {METADATA} but missing; {hint}")
        actual = file_sha256(file)
        if actual != checksums[key]:
            raise DataError(f"{file}: sha256 {actual[:12]}... does not match {METADATA} "
                            f"({str(checksums[key])[:12]}...); {hint}")
    if "task_list_sha256" in checksums and task_list_sha256(metadata["selected_tasks"]) != checksums["task_list_sha256"]:
        raise DataError(f"{folder / METADATA}: selected_tasks do not match task_list_sha256; {hint}")
    return metadata
