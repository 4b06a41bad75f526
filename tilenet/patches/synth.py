"""A deterministic synthetic histology-like dataset, generated chunk by chunk.

Every pixel is a function of its absolute position, the seed and the image index, so any
window can be rendered on its own and the result does not depend on how the image is cut:

* textures are value noise (hashed lattice values, smoothstep-interpolated) and stripe
  patterns evaluated at absolute coordinates, with plain arithmetic only (bit-exact whatever
  the window);
* cells are placed per 64-px grid cell by a generator seeded from (seed, image, grid cell);
  a window renders the objects of every grid cell within reach, each rasterised over its
  whole bounding box and pasted in a fixed global order;
* pixel noise is a hash of (position, channel).

Classes: 0 background (light, faintly textured, with small debris specks), 1 cell (wobbly
ellipses of radius 6-30 px in blue-purple hues, clustered and often touching, dark rim and
chromatin texture), 2 stroma (pink fibrous texture in large regions of a low-frequency field);
a slow per-channel stain variation and per-pixel noise lie over everything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilenet.errors import InputError
from tilenet.fsutil import write_text_atomic
from tilenet.geometry import Window
from tilenet.io.base import LazyImage, Level

__all__ = ["CLASS_NAMES", "SynthImage", "render", "synthesize"]

CLASS_NAMES = ["background", "cell", "stroma"]

_GRID = 64  # object placement grid (px)
_REACH = 36  # an object never extends further than this from its centre (px)
_STROMA_THRESHOLD = np.float32(0.6)
_PIXEL_SIZE = (0.5, 0.5)  # µm, a 20x scan

_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_K1 = _U64(0x9E3779B97F4A7C15)
_K2 = _U64(0xC2B2AE3D27D4EB4F)


# -- hashing -----------------------------------------------------------------------------------
def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    h = h ^ (h >> _U64(30))
    h = h * _M1
    h = h ^ (h >> _U64(27))
    h = h * _M2
    return h ^ (h >> _U64(31))


def _u64(a: np.ndarray | int) -> np.ndarray:
    # at least 1-d: numpy warns on wrapping *scalar* arithmetic, not on array arithmetic
    return np.atleast_1d(np.asarray(a, dtype=np.int64)).view(np.uint64)


def _hash(key: int, iy: np.ndarray | int, ix: np.ndarray | int) -> np.ndarray:
    h = _mix(_u64(iy) * _K1 + _u64(key))
    return _mix(h ^ (_u64(ix) * _K2))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1)."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _key(*parts: int) -> int:
    """A 63-bit key from small ints (seed, image index, purpose)."""
    h = np.zeros(1, np.uint64)
    for p in parts:
        h = _mix(h ^ _u64(np.array([p & 0x7FFFFFFFFFFFFFFF])))
    return int(h[0] >> _U64(1))


# -- noise -------------------------------------------------------------------------------------
def _value_noise(y0: int, x0: int, h: int, w: int, cell: int, key: int) -> np.ndarray:
    """Smooth value noise in [0, 1) on the window, lattice spacing ``cell`` px (float32)."""
    ys = np.arange(y0, y0 + h, dtype=np.int64)
    xs = np.arange(x0, x0 + w, dtype=np.int64)
    iy0, ix0 = y0 // cell, x0 // cell
    ly, lx = ys // cell - iy0, xs // cell - ix0
    gy = np.arange(iy0, iy0 + int(ly[-1]) + 2, dtype=np.int64)
    gx = np.arange(ix0, ix0 + int(lx[-1]) + 2, dtype=np.int64)
    grid = _unit(_hash(key, gy[:, None], gx[None, :])).astype(np.float32)
    fy = ((ys % cell).astype(np.float32) + np.float32(0.5)) / np.float32(cell)
    fx = ((xs % cell).astype(np.float32) + np.float32(0.5)) / np.float32(cell)
    sy = fy * fy * (np.float32(3) - np.float32(2) * fy)
    sx = fx * fx * (np.float32(3) - np.float32(2) * fx)
    rows = grid[:, lx] * (np.float32(1) - sx) + grid[:, lx + 1] * sx
    return rows[ly] * (np.float32(1) - sy)[:, None] + rows[ly + 1] * sy[:, None]


def _value_noise_at(ys: np.ndarray, xs: np.ndarray, cell: int, key: int) -> np.ndarray:
    """Value noise at scattered integer points (used for per-grid-cell decisions)."""
    iy, ix = ys // cell, xs // cell
    fy = ((ys % cell) + 0.5) / cell
    fx = ((xs % cell) + 0.5) / cell
    sy, sx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    v = [_unit(_hash(key, iy + dy, ix + dx)) for dy in (0, 1) for dx in (0, 1)]
    top = v[0] * (1 - sx) + v[1] * sx
    bottom = v[2] * (1 - sx) + v[3] * sx
    return top * (1 - sy) + bottom * sy


def _fbm(y0: int, x0: int, h: int, w: int, cells: tuple[int, ...], key: int) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    total = np.float32(0)
    for i, cell in enumerate(cells):
        amp = np.float32(0.5**i)
        out += amp * _value_noise(y0, x0, h, w, cell, key + i)
        total += amp
    return out / total


def _stroma_field(y0: int, x0: int, h: int, w: int, key: int) -> np.ndarray:
    return _fbm(y0, x0, h, w, (512, 256, 128, 64), key)


def _fibres(y0: int, x0: int, h: int, w: int, key: int) -> np.ndarray:
    """Fibrous texture in [0, 1]: warped stripes in three directions, blended by slow fields.

    Each family has a fixed direction and a bounded warp, so the stripe frequency stays the
    same everywhere (a direction field multiplied by x would alias far from the origin).
    """
    # float64 phases: float32 would lose the stripes far from the origin
    ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :]
    base = float(_unit(np.array([_key(key, 9)], np.uint64))[0]) * np.pi
    out = np.zeros((h, w), np.float32)
    total = np.zeros((h, w), np.float32)
    for i in range(3):
        ang = base + i * np.pi / 3
        warp = _value_noise(y0, x0, h, w, 48, _key(key, 40 + i))
        phase = (xs * np.cos(ang) + ys * np.sin(ang)) / 6.0 + 3.0 * warp
        frac = (phase - np.floor(phase)).astype(np.float32)
        stripe = np.float32(4) * frac * (np.float32(1) - frac)
        weight = _value_noise(y0, x0, h, w, 160, _key(key, 50 + i))
        weight = weight * weight
        weight = weight * weight
        out += weight * stripe * stripe
        total += weight
    breakup = np.float32(0.5) + _value_noise(y0, x0, h, w, 10, _key(key, 6))
    return np.clip(out / total * breakup, 0, 1)


# -- objects -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Blob:
    cy: float
    cx: float
    a: float  # semi-axes (px)
    b: float
    theta: float
    wobble: tuple[tuple[int, float, float], ...]  # (harmonic, amplitude, phase)
    colour: tuple[float, float, float]
    is_cell: bool


def _grid_objects(key: int, gy: int, gx: int, density: float, in_stroma: bool) -> list[_Blob]:
    rng = np.random.default_rng(int(_hash(key, gy, gx)[0]))
    lam = 0.2 + 4.5 * density**1.5
    if in_stroma:
        lam *= 0.35
    blobs = []
    for _ in range(int(rng.poisson(lam))):
        big = rng.random() < 0.25
        r = rng.uniform(15.0, 26.0) if big else rng.uniform(6.5, 14.0)
        aspect = rng.uniform(0.6, 1.0)
        harmonics = tuple(
            (k, float(rng.uniform(0.0, 0.045)), float(rng.uniform(0, 2 * np.pi)))
            for k in (2, 3, 4, 5)
        )
        t = rng.random()  # blue (0) .. purple (1)
        bright = rng.uniform(0.72, 1.12)
        colour = (
            (70 + 60 * t) * bright,
            (70 - 20 * t) * bright,
            (170 - 15 * t) * bright,
        )
        blobs.append(
            _Blob(
                cy=gy * _GRID + rng.random() * _GRID,
                cx=gx * _GRID + rng.random() * _GRID,
                a=r,
                b=r * aspect,
                theta=float(rng.uniform(0, np.pi)),
                wobble=harmonics,
                colour=colour,
                is_cell=True,
            )
        )
    for _ in range(int(rng.poisson(0.25))):  # debris: tiny brownish specks, background
        r = rng.uniform(1.2, 3.0)
        blobs.append(
            _Blob(
                cy=gy * _GRID + rng.random() * _GRID,
                cx=gx * _GRID + rng.random() * _GRID,
                a=r,
                b=r,
                theta=0.0,
                wobble=(),
                colour=(120.0, 90.0, 70.0),
                is_cell=False,
            )
        )
    return blobs


def _rasterise(blob: _Blob) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(y0, x0, inside, alpha, rim) over the blob's whole bounding box.

    Always computed over the full box (never a clipped part), so a blob cut by a window edge
    is bit-identical on both sides.
    """
    reach = blob.a * (1 + sum(a for _, a, _ in blob.wobble)) + 1.5
    y0, x0 = int(np.floor(blob.cy - reach)), int(np.floor(blob.cx - reach))
    y1, x1 = int(np.ceil(blob.cy + reach)), int(np.ceil(blob.cx + reach))
    dy = (np.arange(y0, y1) + 0.5 - blob.cy)[:, None]
    dx = (np.arange(x0, x1) + 0.5 - blob.cx)[None, :]
    c, s = np.cos(blob.theta), np.sin(blob.theta)
    u = (dx * c + dy * s) / blob.a
    v = (-dx * s + dy * c) / blob.b
    rho = np.sqrt(u * u + v * v)
    bound = np.ones_like(rho)
    if blob.wobble:
        phi = np.arctan2(v, u)
        for k, amp, ph in blob.wobble:
            bound = bound + amp * np.cos(k * phi + ph)
    # distance to the border in px (approx.), positive inside
    dist = (bound - rho) * blob.b
    inside = dist > 0
    alpha = np.clip(dist + 0.5, 0.0, 1.0).astype(np.float32)
    rim = (dist < 2.0).astype(np.float32)
    return y0, x0, inside, alpha, rim


def _objects_near(window: Window, seed_key: int) -> list[_Blob]:
    gy0 = (window.y - _REACH) // _GRID
    gy1 = (window.y1 + _REACH) // _GRID
    gx0 = (window.x - _REACH) // _GRID
    gx1 = (window.x1 + _REACH) // _GRID
    gys, gxs = np.mgrid[gy0 : gy1 + 1, gx0 : gx1 + 1]
    cy = (gys * _GRID + _GRID // 2).astype(np.int64)
    cx = (gxs * _GRID + _GRID // 2).astype(np.int64)
    dens = _value_noise_at(cy, cx, 320, _key(seed_key, 11)) * 0.7 + 0.3 * _value_noise_at(
        cy, cx, 120, _key(seed_key, 12)
    )
    dens = np.clip((dens - 0.35) / 0.35, 0.0, 1.0)
    # the coarsest octave of the stroma field: fewer cells inside stroma
    stroma = _value_noise_at(cy, cx, 512, _key(seed_key, 1)) > 0.6
    blobs: list[_Blob] = []
    for (gy, gx), d, st in zip(
        zip(gys.ravel(), gxs.ravel(), strict=True), dens.ravel(), stroma.ravel(), strict=True
    ):
        blobs.extend(_grid_objects(_key(seed_key, 30), int(gy), int(gx), float(d), bool(st)))
    return blobs


# -- rendering ---------------------------------------------------------------------------------
def render(
    window: Window, *, seed: int = 0, index: int = 0, image: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Render ``window`` of synthetic image ``index``: (RGB uint8 (h, w, 3), labels uint8 (h, w)).

    With ``image=False`` only the labels are computed (the RGB is None). The result depends
    only on the absolute window position, never on how an image is split into windows.
    """
    y0, x0, h, w = window.y, window.x, window.h, window.w
    key = _key(seed, index)
    sfield = _stroma_field(y0, x0, h, w, _key(key, 1))
    labels = np.where(sfield > _STROMA_THRESHOLD, np.uint8(2), np.uint8(0))
    rgb = None
    if image:
        bg_tex = _fbm(y0, x0, h, w, (40, 12), _key(key, 2)) - np.float32(0.5)
        bg = np.stack(
            [np.float32(236) + 14 * bg_tex, np.float32(230) + 12 * bg_tex, 238 + 12 * bg_tex],
            axis=-1,
        )
        fibre = _fibres(y0, x0, h, w, key)
        fibre = fibre[:, :, None]
        light = np.array([242, 196, 220], np.float32)
        deep = np.array([212, 100, 160], np.float32)
        stroma = light + (deep - light) * fibre
        a_s = np.clip((sfield - _STROMA_THRESHOLD) * np.float32(150) + np.float32(0.5), 0, 1)
        a_s = a_s[:, :, None]
        rgb_f = bg + (stroma - bg) * a_s
    blobs = _objects_near(window, key)
    if blobs and image:
        chroma = np.float32(0.84) + np.float32(0.3) * _value_noise(y0, x0, h, w, 3, _key(key, 7))
    for blob in blobs:
        by, bx, inside, alpha, rim = _rasterise(blob)
        box = Window(by, bx, inside.shape[0], inside.shape[1])
        part = box.intersect(window)
        if not part.area:
            continue
        src = part.relative_to(box).slices
        dst = part.relative_to(window).slices
        if blob.is_cell:
            lab = labels[dst]
            lab[inside[src]] = 1
        # debris is an artefact on top of the tissue: it does not change the class
        if image:
            col = np.array(blob.colour, np.float32)
            shade = np.float32(1) - np.float32(0.28) * rim[src]
            if blob.is_cell:
                shade = shade * chroma[dst]
            colour = col[None, None, :] * shade[:, :, None]
            a = alpha[src][:, :, None]
            region = rgb_f[dst]
            rgb_f[dst] = region + (colour - region) * a
    if image:
        ys_i = np.arange(y0, y0 + h, dtype=np.int64)[:, None]
        xs_i = np.arange(x0, x0 + w, dtype=np.int64)[None, :]
        nkey = _key(key, 8)
        for ch in range(3):
            # slow stain variation across the slide (+-7 % per channel), as between scans
            stain = _value_noise(y0, x0, h, w, 900, _key(key, 60 + ch))
            rgb_f[:, :, ch] *= np.float32(0.93) + np.float32(0.14) * stain
            hsh = _hash(_key(nkey, ch), ys_i, xs_i)
            u1 = (hsh & _U64(0xFFFF)).astype(np.float32)
            u2 = ((hsh >> _U64(16)) & _U64(0xFFFF)).astype(np.float32)
            rgb_f[:, :, ch] += (u1 + u2 - np.float32(65535)) * np.float32(7.0 / 65535)
        rgb = np.clip(np.floor(rgb_f + np.float32(0.5)), 0, 255).astype(np.uint8)
    return rgb, labels


@dataclass
class SynthImage(LazyImage):
    """A synthetic image (``kind="image"``, RGB) or its class map (``kind="labels"``) as a
    :class:`LazyImage` whose windows are rendered on demand."""

    seed: int = 0
    index: int = 0
    kind: str = "image"
    _labels: bool = field(default=False, repr=False)

    @classmethod
    def create(
        cls, size: int, *, seed: int = 0, index: int = 0, kind: str = "image", tile: int = 256
    ) -> SynthImage:
        if kind not in ("image", "labels"):
            raise InputError(f"kind must be 'image' or 'labels', got {kind!r}")
        return cls(
            path=Path(f"synth:{seed}:{index}:{kind}"),
            format="synthetic",
            dtype=np.dtype(np.uint8),
            channels=3 if kind == "image" else 1,
            levels=[Level((size, size), chunks=(tile, tile))],
            pixel_size=_PIXEL_SIZE,
            seed=seed,
            index=index,
            kind=kind,
        )

    def _read(self, window: Window, level: int) -> np.ndarray:
        rgb, labels = render(window, seed=self.seed, index=self.index, image=self.kind == "image")
        return rgb if rgb is not None else labels


def synthesize(
    out_dir: str | os.PathLike[str],
    *,
    size: int = 2048,
    count: int = 4,
    seed: int = 0,
    tile: int = 256,
) -> list[tuple[Path, Path]]:
    """Write ``count`` synthetic images and class maps; return their (image, labels) paths.

    OUT_DIR/images/synth_NNN.tif are tiled pyramidal RGB OME-TIFFs (deflate, lossless so the
    labels match the pixels exactly); OUT_DIR/labels/synth_NNN.tif are uint8 class maps
    (pyramid by mode); OUT_DIR/classes.json names the classes. Rendered ``tile`` by ``tile``,
    so any ``size`` works in bounded memory.
    """
    from tilenet.io.writers import write_ome_tiff

    for name, value, low in (("size", size, 16), ("count", count, 1), ("tile", tile, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if tile % 16:
        raise InputError(f"tile must be a multiple of 16, got {tile!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        img_path = out / "images" / f"synth_{i:03d}.tif"
        lab_path = out / "labels" / f"synth_{i:03d}.tif"
        write_ome_tiff(
            img_path,
            SynthImage.create(size, seed=seed, index=i, kind="image", tile=tile),
            tile=tile,
            compression="zlib",
            method="mean",
        )
        write_ome_tiff(
            lab_path,
            SynthImage.create(size, seed=seed, index=i, kind="labels", tile=tile),
            tile=tile,
            compression="zlib",
            method="mode",
            channel_names=["class"],
        )
        pairs.append((img_path, lab_path))
    write_text_atomic(out / "classes.json", json.dumps({"classes": CLASS_NAMES}, indent=2) + "\n")
    return pairs
