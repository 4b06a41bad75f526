"""Fuzzing: small real-format files (written by tifffile, rasterio, PIL and an Aperio-layout
SVS), mutated by a seeded generator (truncation, flipped header bytes, wild offsets, corrupt
tile data), each read by ``tilenet info`` and ``tilenet convert``. Every run must end in exit 0
or 2 with at most one error line, never a traceback, an "unexpected" error (a bug caught by the
last-resort guard), an out-of-memory refusal (a reader allocating what a header claims) or a
hang, and each within seconds.

The default run fuzzes a few mutants per format; ``-m slow`` runs 600.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from builders import pyramid_tiff
from PIL import Image
from slidewriters import write_aperio_svs

from tilenet.geometry import Window
from tilenet.patches.synth import render

DRIVER = Path(__file__).with_name("fuzz_driver.py")
#: A single run may take this long on a loaded 2-core machine; a hang is far longer.
SECONDS_PER_RUN = 20.0


def _seeds(d: Path) -> list[Path]:
    """One small file per layout the readers take, each made by its format's own writer."""
    import rasterio
    from rasterio.transform import from_origin

    rgb = render(Window(0, 0, 96, 128), seed=5)[0]
    gray = np.ascontiguousarray(rgb[:, :, 1])
    out = []
    p = d / "jpeg.tif"
    tifffile.imwrite(p, rgb, tile=(64, 64), compression="jpeg", photometric="rgb")
    out.append(p)
    p = d / "pyramid.ome.tif"
    pyramid_tiff(p, rgb, tile=(64, 64), compression="zlib", ome=True)
    out.append(p)
    p = d / "lzw_strips.tif"
    tifffile.imwrite(p, gray, rowsperstrip=16, compression="lzw")
    out.append(p)
    p = d / "image.png"
    Image.fromarray(rgb).save(p)
    out.append(p)
    p = d / "photo.jpg"
    Image.fromarray(rgb).save(p, quality=90)
    out.append(p)
    p = d / "geo.tif"
    profile = {"driver": "GTiff", "height": 96, "width": 128, "count": 1, "dtype": "int16",
               "crs": "EPSG:32633", "transform": from_origin(500000, 4e6, 10, 10),
               "nodata": -9999, "tiled": True, "blockxsize": 64, "blockysize": 64,
               "compress": "deflate"}  # fmt: skip
    with rasterio.open(p, "w", **profile) as ds:
        ds.write(gray.astype(np.int16)[None])
    out.append(p)
    out.append(write_aperio_svs(d / "slide.svs", np.ascontiguousarray(rgb), mpp=0.5, levels=(2,)))
    return out


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One mutation of ``data``: truncation, flipped header bytes, a wild 32-bit value
    (offsets, counts, sizes), corrupt bytes mid-file, or a zeroed range."""
    b = bytearray(data)
    n = len(b)
    kind = int(rng.integers(5))
    if kind == 0:
        return bytes(b[: int(rng.integers(0, n))])
    if kind == 1:
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, min(n, 512)))
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == 2:
        wild = (0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000, n, n - 1, int(rng.integers(2**32)))
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, max(1, min(n, 4096) - 4)))
            b[i : i + 4] = int(wild[int(rng.integers(len(wild)))]).to_bytes(4, "little")
        return bytes(b)
    if kind == 3:
        i = int(rng.integers(n // 4, max(n // 4 + 1, n - 16)))
        k = int(rng.integers(1, 64))
        b[i : i + k] = rng.integers(0, 256, min(k, n - i), dtype=np.uint8).tobytes()
        return bytes(b)
    i = int(rng.integers(0, n))
    k = int(rng.integers(1, 256))
    b[i : i + k] = bytes(min(k, n - i))
    return bytes(b)


def _mutants(d: Path, seeds: list[Path], count: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = seeds[i % len(seeds)]
        p = d / f"m{i:04d}_{src.name}"
        p.write_bytes(_mutate(src.read_bytes(), rng))
        out.append(p)
    return out


def _fuzz(tmp: Path, count: int, seed: int) -> None:
    seeds = _seeds(tmp)
    mutants = _mutants(tmp, seeds, count, seed)
    (tmp / "conv").mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TILENET_PROGRESS": "0"}
    timeout = 60 + SECONDS_PER_RUN * 2 * count / 10
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "8", str(tmp / "conv"), *map(str, seeds)],
        input="\n".join(map(str, mutants)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = proc.stdout.splitlines()
    began = [ln for ln in lines if ln.startswith("BEGIN ")]
    assert proc.returncode == 0 and lines and lines[-1] == "END", (
        f"the driver died (exit {proc.returncode}) on {began[-1] if began else '?'}: "
        f"{proc.stderr[-2000:]}"
    )
    results = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert len(results) == 2 * count
    bad = []
    for r in results:
        stderr = r["stderr"]
        errors = [ln for ln in stderr if ln.startswith("tilenet: error")]
        why = None
        if r["code"] not in (0, 2):
            why = f"exit {r['code']}"
        elif any("Traceback" in ln for ln in stderr):
            why = "traceback"
        elif any("unexpected" in ln or "out of memory" in ln for ln in errors):
            why = errors[0]
        elif len(errors) > 1:
            why = f"{len(errors)} error lines"
        elif r["code"] == 2 and not errors:
            why = "exit 2 without an error line"
        elif r["seconds"] > SECONDS_PER_RUN:
            why = f"{r['seconds']} s"
        if why:
            bad.append(f"{r['cmd']} {Path(r['path']).name}: {why}")
    assert not bad, f"{len(bad)} of {len(results)} runs failed:\n" + "\n".join(bad[:40])


def test_mutated_files_end_in_one_line(tmp_path: Path) -> None:
    _fuzz(tmp_path, 7, seed=1)  # one mutant per seed file (600 with -m slow)


@pytest.mark.slow
def test_six_hundred_mutants_end_in_one_line(tmp_path: Path) -> None:
    _fuzz(tmp_path, 600, seed=2026)
