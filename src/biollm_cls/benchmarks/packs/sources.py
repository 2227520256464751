"""Readers of raw instruction data for the pack builder (and the JSONL/JSON reader the stream shares).

Three sources, each yielding ``RawRow(task, instruction, outputs, definition)`` with the location it came
from, so that every later error can name the file and line:

* ``hf``: a Hugging Face dataset in the Natural-Instructions layout (``task_name``, ``inputs``,
  ``targets``, ``definition``), e.g. ``Muennighoff/natural-instructions``. ``verification_mode=auto``
  tries the library's default checks first and retries without them only on ``ExpectedMoreSplitsError``
  (the reference's workaround for that dataset's split metadata).
* ``ni-tasks``: a directory of Natural-Instructions task files (``tasks/<name>.json`` or ``<dir>/<name>.json``
  with ``Definition``, ``Instances: [{id, input, output: [...]}]``); the task name is the file stem.
* ``jsonl``: one object per line with ``task``, ``instruction``, ``output`` (string or list) and optional
  ``definition``.

Rows are yielded raw; cleaning and selection happen in ``builder``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biollm_cls.benchmarks.errors import DataError, where


@dataclass(frozen=True)
class RawRow:
    task: Any
    instruction: Any
    outputs: Any  # str or list of str (the first non-empty one is the answer)
    definition: Any
    location: str  # "file:line" or "dataset[split] row i", for messages


@dataclass
class Source:
    """An opened source: its rows (an iterator, read once), an optional row count, and facts for metadata.

    `extra_files` are further files the pack carries verbatim (the synthetic pack's `pretrain.jsonl`).
    """

    rows: Iterator[RawRow]
    total: int | None
    info: dict
    extra_files: dict[str, list[dict]] = field(default_factory=dict)


def read_json_records(path: Path, limit: int = 0) -> Iterator[tuple[int, dict]]:
    """(line, object) pairs of a `.jsonl` file (blank lines skipped) or of a `.json` list (line = index + 1).

    `limit` > 0 stops after that many records (records, not line numbers). Raises DataError naming
    the file and line on malformed JSON or a non-object record.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json":
        yield from _read_json_list(path, limit)
        return
    count = 0
    with path.open("rb") as handle:  # bytes, decoded per line: a bad byte is reported with its line
        for lineno, raw in enumerate(handle, start=1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where(path, lineno)}: malformed JSON ({exc.msg}); {LINE_FIX}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where(path, lineno)}: expected a JSON object, got {type(record).__name__}; "
                                f"{LINE_FIX}")
            yield lineno, record
            count += 1
            if limit and count >= limit:
                return


LINE_FIX = "fix or remove the line (JSONL: one JSON object per line)"
UTF8_FIX = "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`) or rebuild it"


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is tolerated
    except UnicodeDecodeError as exc:
        raise DataError(f"{where(path, lineno)}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                        f"{len(raw[:exc.start].decode('utf-8', 'replace')) + 1}); {UTF8_FIX}") from None


def read_utf8(path: Path) -> str:
    """The text of `path`; DataError naming file:line when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{where(path, line)}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); {UTF8_FIX}") from None


def _read_json_list(path: Path, limit: int) -> Iterator[tuple[int, dict]]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects; fix the file (or use JSONL)")
    for index, record in enumerate(data[:limit] if limit else data):
        if not isinstance(record, dict):
            raise DataError(f"{where(path, index + 1)}: expected a JSON object, got {type(record).__name__}; "
                            f"fix the record")
        yield index + 1, record


def _load_json(path: Path) -> Any:
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{where(path, exc.lineno)}: malformed JSON ({exc.msg}); fix the file") from None


def _required(record: dict, key: str, path: Path, line: int) -> Any:
    if key not in record:
        raise DataError(f"{where(path, line, key)}: missing field {key!r}; fix the record (the record has: "
                        f"{', '.join(map(str, record)) or 'no fields'})")
    return record[key]


# ---- jsonl -------------------------------------------------------------------------------------------


def open_jsonl(path: Path) -> Source:
    if not path.is_file():
        raise DataError(f"{path}: no such file (--source jsonl needs --path FILE.jsonl)")

    def rows() -> Iterator[RawRow]:
        for line, record in read_json_records(path):
            yield RawRow(
                task=_required(record, "task", path, line),
                instruction=_required(record, "instruction", path, line),
                outputs=_required(record, "output", path, line),
                definition=record.get("definition", ""),
                location=where(path, line),
            )

    return Source(rows(), None, {"kind": "jsonl", "path": str(path)})


# ---- ni-tasks ----------------------------------------------------------------------------------------


def ni_task_files(path: Path) -> list[Path]:
    """`<path>/tasks/*.json` when that folder exists, else `<path>/*.json`, sorted by name."""
    if not path.is_dir():
        raise DataError(f"{path}: no such directory (--source ni-tasks needs --path DIR of task files)")
    folder = path / "tasks" if (path / "tasks").is_dir() else path
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise DataError(f"{folder}: no Natural-Instructions task files (*.json)")
    return files


def open_ni_tasks(path: Path) -> Source:
    files = ni_task_files(path)

    def rows() -> Iterator[RawRow]:
        for file in files:
            yield from _ni_task_rows(file)

    return Source(rows(), None, {"kind": "ni-tasks", "path": str(path), "task_files": len(files)})


def _ni_task_rows(file: Path) -> Iterator[RawRow]:
    task = _load_json(file)
    if not isinstance(task, dict):
        raise DataError(f"{file}: a task file must hold a JSON object")
    definition = _required(task, "Definition", file, 1)
    if isinstance(definition, list):
        definition = " ".join(str(d) for d in definition)
    instances = _required(task, "Instances", file, 1)
    if not isinstance(instances, list):
        raise DataError(f"{where(file, None, 'Instances')}: expected a list of instances")
    for index, instance in enumerate(instances):
        location = f"{file} (Instances[{index}])"
        if not isinstance(instance, dict) or "input" not in instance or "output" not in instance:
            raise DataError(f"{location}: an instance needs 'input' and 'output'")
        yield RawRow(file.stem, instance["input"], instance["output"], definition, location)


# ---- hf ----------------------------------------------------------------------------------------------


def open_hf(dataset_name: str, dataset_config: str | None, split: str, verification_mode: str) -> Source:
    import datasets

    dataset, mode_used = _load_with_verification(dataset_name, dataset_config, split, verification_mode)
    missing = [c for c in ("task_name", "inputs", "targets") if c not in dataset.column_names]
    if missing:
        raise DataError(f"{dataset_name}[{split}]: missing column(s) {', '.join(missing)} "
                        f"(expected the Natural-Instructions layout: task_name, inputs, targets, definition)")

    def rows() -> Iterator[RawRow]:
        for index, row in enumerate(dataset):
            yield RawRow(row["task_name"], row["inputs"], row["targets"], row.get("definition", ""),
                         f"{dataset_name}[{split}] row {index}")

    info = {
        "kind": "hf", "dataset_name": dataset_name, "dataset_config": dataset_config, "split": split,
        "datasets_version": datasets.__version__, "fingerprint": getattr(dataset, "_fingerprint", None),
        "builder_name": getattr(dataset.info, "builder_name", None), "dataset_size": len(dataset),
        "verification_mode_used": mode_used,
    }
    return Source(rows(), len(dataset), info)


def _load_with_verification(name: str, config: str | None, split: str, mode: str) -> tuple[Any, str]:
    """`strict`: the library's default checks. `auto`: the same, then `no_checks` only when the error is
    ExpectedMoreSplitsError. `no_checks`: no verification."""
    import datasets

    first = "no_checks" if mode == "no_checks" else "basic_checks"
    try:
        return datasets.load_dataset(name, config, split=split, verification_mode=first), first
    except Exception as exc:  # the datasets library raises many types; keep the first line
        if mode == "auto" and "ExpectedMoreSplits" in f"{type(exc).__name__} {exc}":
            try:
                return datasets.load_dataset(name, config, split=split, verification_mode="no_checks"), "no_checks"
            except Exception as retry_exc:
                exc = retry_exc
        first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise DataError(f"cannot load dataset {name!r} (split {split!r}): {type(exc).__name__}: {first_line}") from None
