"""Checkpoint writing: the digest recorded beside a checkpoint is the sha256 of its bytes on disk."""

from __future__ import annotations

import hashlib

import torch

from biollm_cls.checkpoint import load_latest_checkpoint, recorded_digests, save_checkpoint


def test_the_digest_hashed_while_writing_is_the_sha256_of_the_file(tmp_path):
    # large tensors go through the hashing thread, small records inline: both must land in the one digest
    state = {"step": 5, "big": [torch.randn(1 << 19) for _ in range(3)], "small": torch.arange(7), "note": "x"}
    path = save_checkpoint(state, tmp_path, 5, keep_last=2)
    assert recorded_digests(path) == [hashlib.sha256(path.read_bytes()).hexdigest()]
    _, loaded = load_latest_checkpoint(tmp_path, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(loaded["big"], state["big"], strict=True))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # nothing left half-written


def test_a_resave_of_the_same_step_records_only_the_new_digest(tmp_path):
    save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path, 2, keep_last=2)
    path = save_checkpoint({"step": 2, "w": torch.ones(3)}, tmp_path, 2, keep_last=2)
    assert recorded_digests(path) == [hashlib.sha256(path.read_bytes()).hexdigest()]
