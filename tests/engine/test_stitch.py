"""Stitchers and the background pipeline: real zarr arrays, synthetic probability fields."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from tilenet.engine.pipeline import BackgroundWriter, prefetch
from tilenet.engine.stitch import (
    STITCHERS,
    BlendStitcher,
    CropStitcher,
    blend_weights,
    strip_order,
)
from tilenet.geometry import TileGrid
from tilenet.outputs.sink import OutputSink, quantize_probabilities


def _sink(tmp: Path, grid: TileGrid, k: int, dtype: str = "float32") -> OutputSink:
    h, w = grid.shape
    ch, cw = grid.core
    cls = zarr.create_array(tmp / "classes", shape=(h, w), chunks=(ch, cw), dtype="uint8")
    prob = zarr.create_array(tmp / "probs", shape=(k, h, w), chunks=(k, ch, cw), dtype=dtype)
    return OutputSink(num_classes=k, probabilities=prob, classes=cls, probabilities_dtype=dtype)


def _field(k: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A random per-pixel probability field (sums to 1 over classes)."""
    p = np.random.default_rng(seed).random((k, h, w)).astype(np.float32) + 0.01
    return p / p.sum(axis=0, keepdims=True)


@pytest.mark.parametrize("mode", ["gaussian", "linear"])
@pytest.mark.parametrize("shape", [(4, 6), (64, 64), (33, 100), (1, 1)])
def test_blend_weights_positive_symmetric(mode: str, shape: tuple[int, int]) -> None:
    w = blend_weights(shape, mode, ramp=8)  # type: ignore[arg-type]
    assert w.shape == shape and w.dtype == np.float32
    assert (w > 0).all() and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    # Largest in the middle, smallest in a corner.
    assert w[shape[0] // 2, shape[1] // 2] == w.max()
    assert w[0, 0] == w.min()


def test_quantize() -> None:
    p = np.array([0.0, 0.2, 0.5, 1.0], np.float32)
    assert quantize_probabilities(p, "uint8").tolist() == [0, 51, 128, 255]
    assert quantize_probabilities(p, "float16").dtype == np.float16


def test_strip_order_visits_every_tile_once() -> None:
    g = TileGrid((300, 500), 64, 8)
    order = strip_order(g, 3)
    assert sorted(t.index for t in order) == sorted(t.index for t in g)
    # Within the first strip, columns stay below 3.
    first = [t.index[1] for t in order[: 3 * g.counts[0]]]
    assert max(first) == 2


@settings(max_examples=12, deadline=None)
@given(
    # up to 8 x 8 tiles (strips, spilling); each tile costs ~20 ms of zarr calls, so 100 a
    # side (13 x 13 tiles of core 8) took 3.6 s for one example
    h=st.integers(1, 64),
    w=st.integers(1, 64),
    tile=st.sampled_from([16, 24, 32, 48]),
    halo=st.sampled_from([0, 4, 8]),
    strip=st.integers(1, 3),
    mode=st.sampled_from(["gaussian", "linear"]),
)
def test_blend_of_identical_predictions_is_identity(
    tmp_path_factory: pytest.TempPathFactory,
    h: int,
    w: int,
    tile: int,
    halo: int,
    strip: int,
    mode: str,
) -> None:
    """Blending tiles that agree returns exactly what they agree on (spilling included)."""
    if tile <= 2 * halo:
        return
    tmp = tmp_path_factory.mktemp("blend")
    g = TileGrid((h, w), tile, halo)
    sink = _sink(tmp, g, 3)
    field = _field(3, h, w)
    st_ = BlendStitcher(g, sink, mode=mode, spill_dir=tmp / "spill", strip_tiles=strip)  # type: ignore[arg-type]
    for t in st_.order:
        r = t.read.clip(h, w)
        st_.add(t, field[:, r.y : r.y1, r.x : r.x1])
    st_.close()
    np.testing.assert_allclose(sink.probabilities[:], field, atol=1e-6)
    np.testing.assert_array_equal(sink.classes[:], field.argmax(0))
    assert sink.area.sum() == h * w
    assert not (tmp / "spill").exists()


def test_blend_weights_really_average(tmp_path: Path) -> None:
    """Where tiles disagree, the result is a weighted mean strictly between their values."""
    g = TileGrid((40, 200), 40, 8)
    sink = _sink(tmp_path, g, 2)
    st_ = BlendStitcher(g, sink, mode="linear", spill_dir=tmp_path / "spill", strip_tiles=1)
    values = {}
    for t in st_.order:
        r = t.read.clip(40, 200)
        v = 0.1 + 0.8 * (t.index[1] % 2)  # alternate tiles say 0.1 and 0.9 for class 1
        values[t.index] = v
        p = np.empty((2, r.h, r.w), np.float32)
        p[1], p[0] = v, 1 - v
        st_.add(t, p)
    st_.close()
    out = sink.probabilities[1]
    c0 = g[0, 0].core
    # A core pixel far from any neighbour's read window keeps its own tile's value...
    assert out[20, c0.x + c0.w // 2] == pytest.approx(values[0, 0])
    # ...while at the seam between tiles 0 and 1 it is a strict mix of both.
    seam = out[20, c0.x1 - 1]
    assert 0.1 + 1e-3 < seam < 0.9 - 1e-3


def test_blend_open_set_does_not_grow_with_width(tmp_path: Path) -> None:
    opened = []
    for w in (384, 1536):
        g = TileGrid((128, w), 64, 8)
        sink = _sink(tmp_path / str(w), g, 2)
        st_ = BlendStitcher(g, sink, mode="gaussian", spill_dir=tmp_path / "s", strip_tiles=2)
        field = _field(2, 128, w)
        for t in st_.order:
            r = t.read.clip(128, w)
            st_.add(t, field[:, r.y : r.y1, r.x : r.x1])
        st_.close()
        opened.append(st_.max_open)
    assert opened[0] == opened[1]
    # At most ~3 chunk rows of the strip plus its left and right neighbour columns.
    assert opened[1] <= 3 * (2 + 2)


def test_blend_rejects_out_of_order(tmp_path: Path) -> None:
    g = TileGrid((64, 64), 32, 4)
    st_ = BlendStitcher(g, _sink(tmp_path, g, 2), mode="linear", spill_dir=tmp_path / "s")
    t = st_.order[1]
    r = t.read.clip(64, 64)
    with pytest.raises(ValueError, match="out of the declared order"):
        st_.add(t, np.zeros((2, r.h, r.w), np.float32))
    with pytest.raises(RuntimeError, match="closed early"):
        st_.close()


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), core=st.integers(8, 64))
def test_cores_are_whole_chunks(h: int, w: int, core: int) -> None:
    """With chunk = core, every core is one whole chunk (cut only at the image edge)."""
    g = TileGrid((h, w), core + 16, 8)
    ch, cw = g.core
    for t in g:
        c = t.core
        assert c.y % ch == 0 and c.x % cw == 0
        assert c.h == ch or c.y1 == h
        assert c.w == cw or c.x1 == w


def test_crop_stitcher_uint8_and_area(tmp_path: Path) -> None:
    g = TileGrid((50, 70), 32, 4)
    sink = _sink(tmp_path, g, 3, dtype="uint8")
    crop = CropStitcher(sink)
    field = _field(3, 50, 70, seed=3)
    for t in g:
        crop.add(t, field[(slice(None), *t.core.slices)])
    crop.close()
    np.testing.assert_array_equal(sink.probabilities[:], quantize_probabilities(field, "uint8"))
    labels = field.argmax(0)
    np.testing.assert_array_equal(sink.classes[:], labels)
    assert sink.area.tolist() == np.bincount(labels.ravel(), minlength=3).tolist()
    with pytest.raises(ValueError, match="does not fit"):
        sink.write(g[0, 0].core, field[:, :3, :3])


def test_prefetch_keeps_order_and_bounds_depth() -> None:
    alive = 0
    peak = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal alive, peak
        with lock:
            alive += 1
            peak = max(peak, alive)
        time.sleep(0.002 * (i % 3))
        return i * 2

    out = []
    for i, r in prefetch(range(40), work, workers=4, depth=5):
        with lock:
            alive -= 1
        out.append((i, r))
    assert out == [(i, 2 * i) for i in range(40)]
    assert peak <= 5


def test_background_writer_runs_in_order_and_reraises() -> None:
    seen: list[int] = []
    with BackgroundWriter(seen.append, depth=2) as w:
        for i in range(20):
            w.submit(i)
    assert seen == list(range(20))

    def boom(i: int) -> None:
        if i == 3:
            raise OSError("disk full")

    w2: BackgroundWriter[int] = BackgroundWriter(boom, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(50):
            w2.submit(i)
        w2.close()


@pytest.mark.parametrize("name", sorted(STITCHERS))
@pytest.mark.parametrize("constant", [True, False])
def test_every_registered_stitcher_returns_the_field(
    tmp_path: Path, name: str, constant: bool
) -> None:
    """Every STITCHERS entry, fed tiles of one field (the identity model), writes that field
    back: crop takes each tile's core, the blends the read window clipped to the image, in
    strips; overlaps average the same values."""
    g = TileGrid((50, 70), 32, 6)
    k = 3
    field = np.full((k, 50, 70), 1 / k, np.float32) if constant else _field(k, 50, 70, seed=5)
    sink = _sink(tmp_path, g, k)
    stitcher = STITCHERS[name](g, sink, tmp_path / "scratch", strip_tiles=2)
    for t in strip_order(g, 2):
        win = t.core if name == "crop" else t.read.clip(*g.shape)
        stitcher.add(t, field[(slice(None), *win.slices)])
    stitcher.close()
    got = sink.probabilities[:]
    if name == "crop":
        np.testing.assert_array_equal(got, field)
    else:
        np.testing.assert_allclose(got, field, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(sink.classes[:], field.argmax(0))
    assert not (tmp_path / "scratch").exists()  # spills are removed on close
