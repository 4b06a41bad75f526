"""io.view: the one way to derive an image (bands -> resolution -> level), and
LazyImage.replace, the one way a derived image copies its source's header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import pyramid_tiff

from tilenet.config import ResolutionConfig
from tilenet.errors import InputError
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.base import BandSelection
from tilenet.io.view import View, view


@pytest.fixture
def pyramid(tmp_path: Path) -> Path:
    """A 3-band 64x96 OME-TIFF at 0.5 um/px with a level downsampled by 2."""
    arr = np.arange(64 * 96 * 3, dtype=np.uint32).reshape(64, 96, 3).astype(np.uint16)
    path = tmp_path / "p.ome.tif"
    pyramid_tiff(path, arr, tile=(16, 16), pixel_size=(0.5, 0.5))
    return path


def test_view_picks_bands_then_resamples(pyramid: Path) -> None:
    with open_image(pyramid) as img:
        full = img.read(Window(0, 0, 64, 96))
        v = view(img, bands=[3, 1], resolution=ResolutionConfig(mpp=1.0))
        assert isinstance(getattr(v.image, "source", None), BandSelection)  # bands first
        assert v.level == 0 and v.resolution is not None and v.image.channels == 2
        assert v.image.shape == (32, 48, 2) and v.image.pixel_size == (1.0, 1.0)
        got = v.image.read(Window(0, 0, 32, 48))
        np.testing.assert_array_equal(got, img.read(Window(0, 0, 32, 48), 1)[..., [2, 0]])
        plain = view(img, bands=[2], level=1)
        assert plain.level == 1 and plain.resolution is None
        np.testing.assert_array_equal(plain.image.read(Window(0, 0, 64, 96)), full[..., [1]])


def test_view_of_a_view_is_itself_and_takes_no_options(pyramid: Path) -> None:
    with open_image(pyramid) as img:
        v = view(img)
        assert view(v) is v and isinstance(v, View) and v.image is img
        with pytest.raises(InputError, match="already a view"):
            view(v, level=1)
        with pytest.raises(
            InputError, match=r"level 2 does not exist; the image has levels 0\.\.1"
        ):
            view(img, level=2)


def test_replace_carries_every_header_field(pyramid: Path) -> None:
    with open_image(pyramid) as img:
        img.metadata["note"] = "kept"
        sel = img.select_bands([2])
        assert (sel.pixel_size, sel.levels, sel.format) == (img.pixel_size, img.levels, img.format)
        assert sel.metadata["note"] == "kept" and sel.metadata["bands"] == [2]
        sel.metadata["note"] = "changed"
        sel.levels.append(sel.levels[0])
        assert img.metadata["note"] == "kept" and len(img.levels) == 2  # copies, not aliases


def test_an_image_derived_once_is_not_derived_again(pyramid: Path) -> None:
    """A stage may hand on the image it opened or the one it derived: the same view."""
    with open_image(pyramid) as img:
        once = view(img, bands=[3, 1], resolution=ResolutionConfig(mpp=1.0))
        again = view(once.image, bands=[3, 1], resolution=ResolutionConfig(mpp=1.0))
        assert again.image is once.image and again.level == 0
        assert again.resolution == once.resolution
        picked = view(img, bands=[3]).image
        assert picked.channels == 1 and view(picked, bands=[3]).image is picked
        with pytest.raises(InputError, match=r"bands \[2\] do not exist"):
            view(picked, bands=[2])  # other bands: picked from the view, which has one
