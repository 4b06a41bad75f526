"""Stain normalisation (tilenet.stain) against torchstain's numpy backend.

Images: H&E synthesised from known stain concentrations through scikit-image's ``hed2rgb``
(Ruifrok & Johnston's H&E-DAB vectors: nuclei of haematoxylin on an eosin field, glass on
one side, sensor noise), and scikit-image's bundled ``immunohistochemistry()`` (a real
haematoxylin-DAB slide, no download).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from tilenet.errors import InputError
from tilenet.stain import Macenko, Reinhard, stain_from_state

pytest.importorskip("torchstain")


def synthetic_he(seed: int, size: int = 96, h_gain: float = 1.0, e_gain: float = 1.0) -> np.ndarray:
    """RGB uint8 H&E from stain concentrations: nuclei, an eosin field, glass on the left."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    e = ndi.gaussian_filter(rng.random((size, size)), 6)
    e = (e - e.min()) / (e.max() - e.min())
    e = 0.12 * e_gain * (e > 0.3) * e + 0.02
    h = np.zeros((size, size))
    for _ in range(size * size // 300):
        cy, cx = rng.integers(0, size, 2)
        r = rng.uniform(2, 4)
        h[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.3, 0.6) * h_gain
    h = ndi.gaussian_filter(h, 1)
    glass = xx < size // 5
    h[glass], e[glass] = 0, 0
    rgb = hed2rgb(np.stack([h, e, np.zeros_like(h)], -1)) + rng.normal(0, 0.01, (size, size, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _ihc() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry()[100:196, 200:296])


def _t(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _np(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).cpu().numpy()


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, list[np.ndarray]]:
    ref = synthetic_he(0)
    return ref, [synthetic_he(1, h_gain=1.4, e_gain=0.7), synthetic_he(2, 96, 0.8, 1.3), _ihc()]


def test_macenko_matches_torchstain_numpy(images: tuple[np.ndarray, list[np.ndarray]]) -> None:
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    ref, targets = images
    ts = NumpyMacenkoNormalizer()
    ts.fit(ref)
    n = Macenko().fit(ref)
    out, ok = n.normalize(_t(*targets))  # one batch, each tile on its own
    assert ok.all()
    for got, img in zip(_np(out), targets, strict=True):
        want = ts.normalize(img, stains=False)[0]
        diff = np.abs(want.astype(int) - got.astype(int))
        assert diff.max() <= 2, diff.max()
        assert np.abs(want.astype(int) - img.astype(int)).mean() > 3  # it did change colours
    np.testing.assert_allclose(n.stain_matrix.numpy(), ts.HERef, atol=1e-3)
    np.testing.assert_allclose(n.max_conc.numpy(), ts.maxCRef, rtol=1e-3)


def test_reinhard_matches_torchstain_numpy(images: tuple[np.ndarray, list[np.ndarray]]) -> None:
    from torchstain.numpy.normalizers.reinhard import NumpyReinhardNormalizer

    ref, targets = images
    ts = NumpyReinhardNormalizer()
    ts.fit(ref)
    out, ok = Reinhard().fit(ref).normalize(_t(*targets))
    assert ok.all()
    for got, img in zip(_np(out), targets, strict=True):
        want = ts.normalize(img)
        assert np.abs(want.astype(int) - got.astype(int)).max() <= 2


@pytest.mark.parametrize("cls", [Macenko, Reinhard])
def test_white_black_flat_and_one_stain_tiles_pass_through(
    cls: type[Macenko] | type[Reinhard], images: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    ref, targets = images
    n = cls().fit(ref)
    s = ref.shape[0]
    white = np.full((s, s, 3), 255, np.uint8)
    black = np.zeros((s, s, 3), np.uint8)
    flat = np.full((s, s, 3), (180, 90, 160), np.uint8)
    batch = _t(white, black, flat, targets[0], white)
    out, ok = n.normalize(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert ok.tolist() == [False, False, False, True, False]
    for i in (0, 1, 2, 4):
        assert torch.equal(out[i], batch[i])
    assert not torch.equal(out[3], batch[3])
    assert torch.equal(n(_t(white, white)), _t(white, white))  # a batch of white tiles
    if cls is Macenko:  # haematoxylin only: one stain direction, passed through
        from skimage.color import hed2rgb

        h = np.zeros((s, s, 3))
        h[..., 0] = np.linspace(0.05, 0.35, s)[None, :]
        noise = np.random.default_rng(0).normal(0, 2, h.shape)
        one = np.clip(hed2rgb(h) * 255 + noise, 0, 255).astype(np.uint8)
        out, ok = n.normalize(_t(one))
        assert not ok[0] and torch.equal(out[0], _t(one)[0])


def test_batched_equals_one_by_one_and_chunks(images: tuple[np.ndarray, list[np.ndarray]]) -> None:
    ref, targets = images
    n = Macenko().fit(ref)
    batch = _t(*targets)
    alone = torch.cat([n(batch[i : i + 1]) for i in range(len(targets))])
    assert torch.equal(n(batch), alone)
    small = Macenko(chunk_pixels=1).fit(ref)  # one tile per chunk
    assert torch.equal(small(batch), alone)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_with_source_maps_tiles_as_the_whole_image(
    method: str, images: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    """One source estimate for a slide: tiles come out as the whole image does (no seams)."""
    from tilenet.stain import make_stain

    ref, targets = images
    src = targets[0]
    n = make_stain(method, ref)
    whole_per_image = n(_t(src))
    n.with_source(src)
    whole = n(_t(src))
    assert torch.equal(whole, whole_per_image)  # the source is the image itself
    tiles, ok = n.normalize(_t(src[:48, :48], src[48:, 48:], np.full((48, 48, 3), 255, np.uint8)))
    assert ok.all()
    assert torch.equal(tiles[0], whole[0, :, :48, :48])
    assert torch.equal(tiles[1], whole[0, :, 48:, 48:])
    with pytest.raises(InputError, match="source"):
        make_stain(method, ref).with_source(np.full_like(src, 255))


@pytest.mark.parametrize("cls", [Macenko, Reinhard])
def test_state_round_trips_through_torch_save(
    cls: type[Macenko] | type[Reinhard], images: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    ref, targets = images
    n = cls().fit(ref)
    buf = io.BytesIO()
    torch.save(n.state_dict(), buf)
    buf.seek(0)
    again = stain_from_state(torch.load(buf, weights_only=True))
    assert type(again) is cls
    batch = _t(*targets)
    assert torch.equal(again(batch), n(batch))


def test_bad_input_is_one_line() -> None:
    with pytest.raises(InputError, match="uint8 tensor"):
        Macenko()(torch.zeros(1, 3, 4, 4))
    with pytest.raises(InputError, match="RGB uint8"):
        Macenko().fit(np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="two stains"):
        Macenko().fit(np.full((16, 16, 3), 255, np.uint8))
    with pytest.raises(InputError, match="call fit"):
        Reinhard()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(InputError, match="method"):
        stain_from_state({"method": "vahadane"})


@pytest.mark.gpu
def test_runs_on_the_device(images: tuple[np.ndarray, list[np.ndarray]]) -> None:
    ref, targets = images
    for cls in (Macenko, Reinhard):
        n = cls().fit(ref)
        batch = _t(*targets)
        got = n(batch.cuda())
        assert got.is_cuda and got.dtype == torch.uint8
        assert (got.cpu().int() - n(batch).int()).abs().max() <= 1
