from __future__ import annotations

from pathlib import Path

import pytest

from tilenet.fsutil import atomic_output, safe_stem, write_text_atomic


def test_atomic_output_renames_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out.ome.zarr"
    with pytest.raises(RuntimeError), atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output(final) as tmp:
        tmp.mkdir()
        (tmp / "done").write_text("x")
        assert not final.exists()
    assert (final / "done").read_text() == "x"


def test_files_replace_files_and_directories(tmp_path: Path) -> None:
    final = write_text_atomic(tmp_path / "a" / "summary.json", "old")
    assert final.read_text() == "old"
    with pytest.raises(RuntimeError), atomic_output(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert final.read_text() == "old" and sorted(final.parent.iterdir()) == [final]
    assert write_text_atomic(final, "new").read_text() == "new"
    with atomic_output(final) as tmp:  # a directory over a file
        tmp.mkdir()
    assert final.is_dir()
    assert write_text_atomic(final, "file again").read_text() == "file again"  # and back
    assert sorted(final.parent.iterdir()) == [final]


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/abs/path/img.tif", "a/../../b.tif", "..", ".", "", "C:\\x\\..\\y.svs"],
)
def test_safe_stem_stays_inside(tmp_path: Path, name: str) -> None:
    stem = safe_stem(name)
    assert stem and "/" not in stem and "\\" not in stem and stem not in {".", ".."}
    assert (tmp_path / stem).resolve().parent == tmp_path.resolve()
