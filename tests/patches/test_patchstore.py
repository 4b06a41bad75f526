"""The patch-store format: creating, recognising and opening stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

from tilenet.errors import ImageNotFoundError, InputError
from tilenet.patches import patchstore


def test_create_read_open(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    attrs = {"format": patchstore.FORMAT, "sources": [{"fingerprint": "abc"}], "count": 0}
    patchstore.create_store(
        out, patch=8, channels=3, dtype="uint8", labels=False, chunk_patches=2, attrs=attrs
    )
    group = patchstore.open_store(out)
    assert sorted(group.array_keys()) == [patchstore.COORDS, patchstore.IMAGES]
    assert group[patchstore.IMAGES].shape == (0, 8, 8, 3)
    assert patchstore.read_attrs(out) == attrs
    assert patchstore.source_fingerprints(out) == {"abc"}


def test_not_a_store(tmp_path: Path) -> None:
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w", attributes={"format": "something-else"})
    assert patchstore.read_attrs(other) is None
    assert patchstore.read_attrs(tmp_path / "missing.zarr") is None
    assert patchstore.source_fingerprints(tmp_path / "missing.zarr") == set()
    with pytest.raises(InputError, match="not a tilenet patch store"):
        patchstore.open_store(other)
    with pytest.raises(ImageNotFoundError, match="patch store not found"):
        patchstore.open_store(tmp_path / "missing.zarr")
