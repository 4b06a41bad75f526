from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tilenet.checkpoint import load_checkpoint, save_checkpoint
from tilenet.errors import CheckpointError


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": "tilenet-checkpoint", "spec": _Evil()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned.txt").exists()


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pt"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a tilenet checkpoint"):
        load_checkpoint(other)


def test_round_trip_is_plain_data(tmp_path: Path) -> None:
    spec = {
        "name": "tiny",
        "in_channels": 3,
        "num_classes": 2,
        "kwargs": {},
        "stride": 1,
        "receptive_field": 3,
    }
    payload = {"spec": spec, "model": {"w": torch.ones(3)}, "rng": [1, 2, 3]}
    path = save_checkpoint(tmp_path / "c.pt", payload)
    back = load_checkpoint(path)
    assert back["spec"] == spec
    assert torch.equal(back["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
