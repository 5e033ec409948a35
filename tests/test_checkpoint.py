"""Checkpoints: atomic writes, validated loads, falling back to the previous good file."""

import logging
import os

import pytest
import torch

from runner import checkpoint
from runner.checkpoint import CheckpointError, find_resume, load, previous, save


def _payload(step):
    return {"format": checkpoint.FORMAT, "model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "state": {"step": step}, "callbacks": {}, "rng": {}}


def test_save_replaces_atomically_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    save(_payload(1), path)
    save(_payload(2), path)
    assert load(path)["state"]["step"] == 2
    assert load(previous(path))["state"]["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.pt"]  # no temporary left


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(b""),  # zero length
        lambda p: p.write_bytes(os.urandom(4096)),  # random bytes
        lambda p: torch.save({"weights": torch.zeros(1)}, p),  # a torch file, not ours
    ],
    ids=["truncated", "empty", "random", "foreign"],
)
def test_a_damaged_last_falls_back_to_the_previous_good_one(tmp_path, damage, caplog):
    path = tmp_path / "last.pt"
    save(_payload(1), path)
    save(_payload(2), path)
    damage(path)
    with caplog.at_level(logging.WARNING):
        payload, used = find_resume(None, tmp_path)
    assert used == previous(path) and payload["state"]["step"] == 1
    assert "last.pt" in caplog.text and "previous good checkpoint" in caplog.text


def test_no_good_checkpoint_refuses_rather_than_starting_over(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint to resume from: .*last.pt' is unreadable.*delete .* to start over, or pass ckpt_path="):
        find_resume(None, tmp_path)


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert find_resume(None, tmp_path) is None
