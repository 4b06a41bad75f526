"""Properties of the tile geometry, checked with hypothesis."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilenet.errors import InputError
from tilenet.geometry import (
    GeoTransform,
    TileGrid,
    Window,
    ceil_to,
    coerce_pair,
    iter_bands,
    iter_blocks,
    spans,
)

settings.register_profile("tilenet", max_examples=100, deadline=None)
settings.load_profile("tilenet")


@st.composite
def grids(draw: st.DrawFn, edge: str | None = None) -> TileGrid:
    """Random valid grids: align in {1, 2, 4, 8, 16}, tile and halo multiples of align,
    images up to 300 pixels and 40 cores a side."""
    align = draw(st.sampled_from([1, 2, 4, 8, 16]))
    hy = draw(st.integers(0, 4)) * align
    hx = draw(st.integers(0, 4)) * align
    cy = draw(st.integers(1, 6)) * align
    cx = draw(st.integers(1, 6)) * align
    # at most ~40 cores per axis: every edge case (image smaller than a tile, a last core
    # cut short, alignment) shows within that, and a grid of 300 one-pixel cores per axis
    # (90 000 tiles) only costs time
    shape = (draw(st.integers(1, min(300, 40 * cy))), draw(st.integers(1, min(300, 40 * cx))))
    e = edge or draw(st.sampled_from(["clamp", "pad"]))
    return TileGrid(shape, (cy + 2 * hy, cx + 2 * hx), (hy, hx), align=align, edge=e)  # type: ignore[arg-type]


@given(grids())
def test_cores_partition_the_image(g: TileGrid) -> None:
    count = np.zeros(g.shape, dtype=np.int32)
    for t in g:
        assert t.core.area > 0
        assert t.core.inside(*g.shape)
        count[t.core.slices] += 1
    assert (count == 1).all()


@given(grids())
def test_tile_count_matches_docstring_formula(g: TileGrid) -> None:
    (h, w), (th, tw), (hy, hx) = g.shape, g.tile, g.halo
    expected = math.ceil(h / (th - 2 * hy)) * math.ceil(w / (tw - 2 * hx))
    assert len(g) == expected == len(list(g))


@given(grids())
def test_read_window_contains_core(g: TileGrid) -> None:
    for t in g:
        assert t.read.contains(t.core)
        ci = t.core_in_read
        assert ci.inside(*t.read.shape)


@given(grids(edge="clamp"))
def test_clamp_reads_inside_the_aligned_extent(g: TileGrid) -> None:
    eh, ew = g.extent
    assert eh - g.shape[0] < g.align and ew - g.shape[1] < g.align
    for t in g:
        assert t.read.inside(eh, ew)
        # full tile size unless the extent itself is smaller than a tile
        assert t.read.h == min(g.tile[0], eh) and t.read.w == min(g.tile[1], ew)


@given(grids(edge="clamp"))
def test_clamp_reads_inside_the_image_when_unaligned(g: TileGrid) -> None:
    g1 = TileGrid(g.shape, g.tile, g.halo, align=1, edge="clamp")
    for t in g1:
        assert t.read.inside(*g1.shape)


@given(grids(edge="clamp"))
def test_alignment_holds(g: TileGrid) -> None:
    s = g.align
    for t in g:
        assert t.read.y % s == 0 and t.read.x % s == 0
        assert t.read.h % s == 0 and t.read.w % s == 0
        assert t.core.y % s == 0 and t.core.x % s == 0


@given(grids(edge="pad"))
def test_pad_reads_are_core_grown_by_halo(g: TileGrid) -> None:
    for t in g:
        assert t.read.shape == g.tile
        assert (t.read.y, t.read.x) == (t.core.y - g.halo[0], t.core.x - g.halo[1])


@given(
    st.tuples(st.integers(1, 400), st.integers(1, 400)),
    st.integers(2, 64),
    st.integers(0, 16),
)
def test_patch_windows_cover_image_with_full_patches(
    shape: tuple[int, int], patch: int, half: int
) -> None:
    overlap = 2 * half
    if overlap >= patch:
        with pytest.raises(InputError):
            TileGrid.for_patches(shape, patch, overlap)
        return
    stride = (
        patch - overlap
    )  # at most ~40 patches a side: a 400-pixel side at stride 1 only costs time
    shape = (min(shape[0], 40 * stride), min(shape[1], 40 * stride))
    g = TileGrid.for_patches(shape, patch, overlap)
    wins = g.windows()
    assert len(set(wins)) == len(wins) <= len(g)
    seen = np.zeros(shape, dtype=bool)
    for w in wins:
        assert w.inside(*shape)
        assert w.shape == (min(patch, shape[0]), min(patch, shape[1]))
        seen[w.slices] = True
    assert seen.all()
    # neighbouring patch origins step by patch - overlap except where clamped at the far edge
    ys = sorted({w.y for w in wins})
    for a, b in itertools.pairwise(ys):
        assert 0 < b - a <= patch - overlap


def test_patch_grid_rejects_odd_overlap() -> None:
    with pytest.raises(InputError, match="even"):
        TileGrid.for_patches((100, 100), 32, 5)


@given(
    st.integers(-500, 500),
    st.integers(-500, 500),
    st.integers(0, 300),
    st.integers(0, 300),
    st.sampled_from([1, 2, 4, 8, 16, 32]),
)
def test_level_roundtrip(y: int, x: int, h: int, w: int, ds: int) -> None:
    win = Window(y, x, h, w)
    # level k -> level 0 -> level k is the identity for integer downsamples
    assert win.from_level(ds).to_level(ds) == win
    # level 0 -> level k covers the window when mapped back
    assert win.to_level(ds).from_level(ds).contains(win)


@given(st.integers(-100, 100), st.integers(-100, 100), st.integers(0, 50), st.integers(0, 50))
def test_window_intersect_clip(y: int, x: int, h: int, w: int) -> None:
    win = Window(y, x, h, w)
    c = win.clip(40, 30)
    assert c.area == 0 or (c.inside(40, 30) and win.contains(c))
    a = np.zeros((40, 30), bool)
    a[max(y, 0) : max(min(y + h, 40), 0), max(x, 0) : max(min(x + w, 30), 0)] = True
    assert a.sum() == c.area


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (0, 10), "tile": 8}, "shape must be positive"),
        ({"shape": (10, 10), "tile": 8, "halo": 4}, "no core"),
        ({"shape": (10, 10), "tile": 12, "align": 8}, "multiple of align"),
        ({"shape": (10, 10), "tile": 8, "edge": "wrap"}, "edge must be"),
        ({"shape": (10, 10), "tile": -8}, "non-negative"),
    ],
)
def test_grid_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        TileGrid(**kwargs)


def test_window_validates() -> None:
    with pytest.raises(InputError):
        Window(0, 0, -1, 2)
    with pytest.raises(InputError):
        Window(0.5, 0, 1, 2)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        coerce_pair(True, "tile")  # type: ignore[arg-type]
    assert ceil_to(33, 16) == 48


def test_grid_is_frozen() -> None:
    g = TileGrid((64, 64), 32, 8)
    with pytest.raises(AttributeError):
        g.align = 2  # type: ignore[misc]


@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 70), st.integers(1, 70))
def test_blocks_partition_the_image(h: int, w: int, by: int, bx: int) -> None:
    cover = np.zeros((h, w), np.int32)
    blocks = list(iter_blocks((h, w), (by, bx)))
    for b in blocks:
        assert b.inside(h, w) and b.area > 0 and b.h <= by and b.w <= bx
        cover[b.slices] += 1
    assert (cover == 1).all()
    assert len(blocks) == math.ceil(h / by) * math.ceil(w / bx)
    assert blocks == sorted(blocks)  # row-major
    bands = list(iter_bands((h, w), by))
    assert [(b.y, b.y1) for b in bands] == spans(h, by)
    assert all(b.x == 0 and b.w == w for b in bands)
    assert sum(b.h for b in bands) == h


def test_blocks_reject_bad_sizes() -> None:
    with pytest.raises(InputError, match="step must be a positive int"):
        spans(10, 0)
    with pytest.raises(InputError, match="block"):
        list(iter_blocks((10, 10), (4, -1)))


_coef = st.floats(-1e3, 1e3, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-2)


@st.composite
def geotransforms(draw: st.DrawFn) -> GeoTransform:
    """Random invertible, reasonably conditioned GDAL-order transforms."""
    t = [draw(_coef) for _ in range(6)]
    if abs(t[1] * t[5] - t[2] * t[4]) < 1e-2 * max(1.0, max(abs(v) for v in t) ** 2):
        t[1], t[2], t[4], t[5] = 3.0, 0.0, 0.0, -2.0
    return GeoTransform.from_gdal(t)


@given(geotransforms(), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_geotransform_inverse_maps_back(gt: GeoTransform, col: float, row: float) -> None:
    x, y = gt(col, row)
    for back in ((~gt)(x, y), gt.pixel_of(x, y)):
        assert back == pytest.approx((col, row), rel=1e-6, abs=1e-6)


@given(
    geotransforms(), st.integers(-50, 50), st.integers(-50, 50), st.sampled_from([1.0, 2.0, 4.0])
)
def test_geotransform_shift_and_scale_move_pixels(
    gt: GeoTransform, row: int, col: int, s: float
) -> None:
    assert gt.shifted(row, col)(1.0, 2.0) == pytest.approx(gt(col + 1.0, row + 2.0))
    assert gt.scaled((s, s))(1.0, 2.0) == pytest.approx(gt(s, 2 * s))
    assert gt.scaled((s, s)).pixel_area == pytest.approx(gt.pixel_area * s * s)


def test_geotransform_is_a_gdal_tuple() -> None:
    gt = GeoTransform.from_gdal(np.array([500000, 10, 0, 4e6, 0, -10]))
    x0, *_, dy = gt
    assert gt == (500000.0, 10.0, 0.0, 4e6, 0.0, -10.0) and (x0, dy) == (gt.x0, gt[5])
    assert gt.gsd == (10.0, 10.0) and gt.pixel_area == 100.0 and not gt.is_identity
    xs, ys = gt(np.array([0, 2]), np.array([0, 1]))
    assert xs.tolist() == [500000.0, 500020.0] and ys.tolist() == [4e6, 4e6 - 10]


@pytest.mark.parametrize(
    "bad", [(0, 1, 0, 0, 0), (0, 1, 0, 0, 0, 0), (0, math.nan, 0, 0, 0, 1), ("a",) * 6, None]
)
def test_geotransform_rejects_bad_input(bad: object) -> None:
    with pytest.raises(InputError, match="6 GDAL-order numbers, invertible"):
        GeoTransform.from_gdal(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not invertible"):
        ~GeoTransform(0.0, 1.0, 1.0, 0.0, 1.0, 1.0)
