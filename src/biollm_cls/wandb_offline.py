"""Read what an offline W&B run recorded, without a server (``python -m biollm_cls.wandb_offline DIR``).

wandb 0.31 ships no Python reader of its run files (the old ``wandb.sdk.internal.datastore`` moved
into the Go core), so this is a small one. A ``run-<id>.wandb`` file is a LevelDB-style log: a 7-byte
header (``":W&B"``, magic ``0xBEE1``, version 0), then 32 KiB blocks of chunks, each with a 7-byte
header (crc32 ``uint32``, length ``uint16``, type ``uint8``: 1 full, 2 first, 3 middle, 4 last). Every
record is a ``wandb_internal_pb2.Record`` protobuf, decoded with wandb's own message classes.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of one ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:  # just created, header not flushed yet
        return
    ident, magic, _version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer: too small for a chunk header
            pos += left
            continue
        _crc, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding: end of the written data
            break
        if pos + _CHUNK.size + length > len(data):  # a chunk still being written
            return
        chunk = data[pos + _CHUNK.size: pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _decode(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


@dataclass
class OfflineRun:
    """The parts of an offline run a test or a curious user wants: identity, history, summary, artifacts."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def keys(self) -> set[str]:
        """Every key that appears in some history row."""
        return {k for row in self.history for k in row}


def read_run_file(path: str | Path) -> OfflineRun:
    """Decode one ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = OfflineRun()
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.run_id, out.name, out.group, out.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            out.config.update({i.key: _decode(i.value_json) for i in r.config.update})
        elif kind == "config":
            out.config.update({_item_key(i): _decode(i.value_json) for i in record.config.update})
        elif kind == "history":
            out.history.append({_item_key(i): _decode(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out.summary.update({_item_key(i): _decode(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            a = record.artifact
            out.artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                  "files": [c.path for c in a.manifest.contents]})
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out


def read_finished_run(path: str | Path, timeout_s: float = 15.0) -> OfflineRun:
    """``read_run_file`` once the run's exit record is on disk.

    ``run.finish()`` returns before wandb's core process has flushed the file, so a reader in the same
    process polls until the ``exit`` record appears (or ``timeout_s`` passes; then it returns what is there).
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run = read_run_file(path)
        except DecodeError:  # a record caught mid-write
            run = OfflineRun()
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def run_files(wandb_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files under a directory (a run dir, its ``wandb/`` or one ``offline-run-*``), oldest first."""
    return sorted(Path(wandb_dir).rglob("run-*.wandb"), key=lambda p: p.parent.name)


def main(argv: list[str] | None = None) -> int:
    """Print a JSON digest (id, name, group, history keys, summary, artifacts) of each offline run found."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m biollm_cls.wandb_offline <run_dir | wandb dir | offline-run-dir>", file=sys.stderr)
        return 2
    for path in run_files(argv[0]):
        run = read_run_file(path)
        digest = {"file": str(path), "run_id": run.run_id, "name": run.name, "group": run.group,
                  "job_type": run.job_type, "history_rows": len(run.history), "history_keys": sorted(run.keys()),
                  "summary": run.summary, "artifacts": run.artifacts, "exit_code": run.exit_code}
        print(json.dumps(digest, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
