"""Side-by-side: the same whole-slide image read by tilenet and by openslide-python.

Writes (in a temporary directory) a synthetic ``--side``² RGB slide in two formats, from the
same pool of pre-encoded 256² JPEG tiles (so a 16k² slide is written in seconds; decoding cost
per tile is unchanged): an Aperio-layout SVS (tifffile; pyramid 1, 4, 16, thumbnail, label,
macro) and a DICOM-WSI series (pydicom; TILED_FULL, one file per level). Contenders, each with
its own handle, run interleaved per round in one process, one thread:

* ``openslide``: ``np.asarray(slide.read_region(loc, 0, (512, 512)).convert("RGB"))``, what
  openslide-python users write;
* ``tilenet``: ``tilenet.io.open_image(path).read(Window(...))`` (SVS: tifffile path);
* ``tilenet_openslide`` (SVS only): tilenet's OpenSlide reader (``tilenet.io.slide``), which
  ``open_image`` uses for DICOM and the vendor formats.

Two passes per contender at level 0: ``random`` (``--windows`` random 512² windows, not tile
aligned) and ``grid`` (every 512² window of the level in raster order). Windows/s and Mpx/s are
the best of ``--rounds``; ``ratio`` is tilenet's Mpx/s over OpenSlide's. Reads are single
threaded, so Mpx per CPU second (``ratio_cpu``) is also given: on a shared machine it is the
steadier figure. The first windows are compared pixel for pixel (``identical``).

    python scripts/bench_slides.py --out docs/bench_slides.json   # 16384², ~5 min on 2 cores
    python scripts/bench_slides.py --quick                          # 2048² smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu

WIN = 512
TILE = 256
_POOL = 64
_DESC = "Aperio Image Library v12.0.15 \r\n"
_SOP = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _tile_pool() -> list[bytes]:
    """``_POOL`` distinct 256² JPEG tiles: smooth stain-like structure plus noise."""
    import imagecodecs

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    pool = []
    for i in range(_POOL):
        y, x = yy + i * TILE, xx + (i * 3) * TILE
        base = np.stack(
            [
                140 + 90 * np.sin(y / 37.0) * np.cos(x / 23.0),
                120 + 80 * np.cos((x + y) / 51.0),
                150 + 60 * np.sin(x / 17.0),
            ],
            axis=-1,
        )
        rgb = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        pool.append(bytes(imagecodecs.jpeg8_encode(rgb, level=90)))
    return pool


def _tiles(pool: list[bytes], side: int) -> Iterator[bytes]:
    n = -(-side // TILE)
    return (pool[(i * 7 + i // n) % _POOL] for i in range(n * n))


def write_svs(path: Path, side: int, pool: list[bytes]) -> Path:
    """An Aperio-layout SVS OpenSlide accepts: tiled JPEG levels 1, 4, 16, a stripped
    thumbnail as page 2, label and macro pages; never held whole in memory."""
    import tifffile

    meta = "|AppMag = 20|MPP = 0.4990"
    kw: dict[str, Any] = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        desc = f"{_DESC}{side}x{side} [0,0 {side}x{side}] ({TILE}x{TILE}) JPEG/RGB Q=90{meta}"
        tw.write(
            _tiles(pool, side),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            description=desc,
            **kw,
        )
        thumb = np.full((side // 64, side // 64, 3), 200, np.uint8)
        tw.write(thumb, compression="jpeg", description=f"{_DESC}thumbnail{meta}", **kw)
        for f in (4, 16):
            s = side // f
            tw.write(
                _tiles(pool, s),
                shape=(s, s, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                description=f"{_DESC}{side}x{side} -> {s}x{s}{meta}",
                **kw,
            )
        small = np.full((128, 256, 3), 120, np.uint8)
        tw.write(small, compression="lzw", subfiletype=1, description=f"{_DESC}label 256x128", **kw)
        tw.write(
            small, compression="jpeg", subfiletype=9, description=f"{_DESC}macro 256x128", **kw
        )
    return path


def write_dicom(folder: Path, side: int, pool: list[bytes]) -> Path:
    """A DICOM-WSI series (pydicom): TILED_FULL, JPEG baseline frames, one file per level."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid

    folder.mkdir(exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    for i, f in enumerate((1, 4, 16)):
        s = side // f
        frames = list(_tiles(pool, s))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(_SOP)
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SOPClassUID, ds.SOPInstanceUID = UID(_SOP), ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality, ds.PatientName, ds.PatientID = "SM", "Bench^Slide", "1"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if f > 1:
            ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.Rows = ds.Columns = TILE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames = len(frames)
        ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = s
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = side * 0.25 / 1000
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [0.25 * f / 1000] * 2
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([path])
        ds.NumberOfOpticalPaths = 1
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"level{i}.dcm", enforce_file_format=True)
    return folder


def _windows(side: int, kind: str, count: int) -> list[tuple[int, int]]:
    if kind == "grid":
        return [
            (y, x) for y in range(0, side - WIN + 1, WIN) for x in range(0, side - WIN + 1, WIN)
        ]
    rng = np.random.default_rng(1)
    return [(int(y), int(x)) for y, x in rng.integers(0, side - WIN, (count, 2))]


def _reader(name: str, path: Path) -> tuple[Callable[[int, int], np.ndarray], Callable[[], None]]:
    """``read(y, x)`` of a 512² window at level 0 as (512, 512, 3) uint8, and ``close``."""
    if name == "openslide":
        import openslide

        target = path if path.is_file() else path / "level0.dcm"
        slide = openslide.OpenSlide(target)

        def read_os(y: int, x: int) -> np.ndarray:
            return np.asarray(slide.read_region((x, y), 0, (WIN, WIN)).convert("RGB"))

        return read_os, slide.close
    from tilenet.geometry import Window
    from tilenet.io import LazyImage

    img: LazyImage
    if name == "tilenet_openslide":
        from tilenet.io.slide import open_slide

        img = open_slide(path)
    else:
        from tilenet.io import open_image

        img = open_image(path)

    def read_tn(y: int, x: int) -> np.ndarray:
        return img.read(Window(y, x, WIN, WIN))

    return read_tn, img.close


def _measure(name: str, path: Path, wins: list[tuple[int, int]]) -> dict[str, float]:
    read, close = _reader(name, path)
    try:
        read(*wins[-1])  # open the level, warm the file handle
        t0, c0 = time.perf_counter(), time.process_time()
        for y, x in wins:
            read(y, x)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        close()
    mpx = len(wins) * WIN * WIN / 1e6
    return {
        "windows_per_s": round(len(wins) / dt, 2),
        "mpx_per_s": round(mpx / dt, 2),
        "seconds": round(dt, 3),
        "mpx_per_cpu_s": round(mpx / cpu, 2),
        "cpu_s": round(cpu, 3),
    }


def _identical(names: list[str], path: Path, wins: list[tuple[int, int]]) -> bool:
    readers = [_reader(n, path) for n in names]
    try:
        return all(
            np.array_equal(readers[0][0](y, x), r[0](y, x)) for y, x in wins for r in readers[1:]
        )
    finally:
        for _, close in readers:
            close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="bench_results/bench_slides.json", help="JSON result path")
    ap.add_argument("--side", type=int, default=16384, help="slide side in pixels (level 0)")
    ap.add_argument("--windows", type=int, default=300, help="random windows per pass")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the best is reported")
    ap.add_argument("--quick", action="store_true", help="2048² slide, 20 windows, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.side, args.windows, args.rounds = 2048, 20, 1

    formats = {
        "svs": ["openslide", "tilenet", "tilenet_openslide"],
        "dicom": ["openslide", "tilenet"],
    }
    result: dict[str, Any] = {
        "machine": bu.machine_info(),
        "side": args.side,
        "window": WIN,
        "tile": TILE,
        "windows_random": args.windows,
        "rounds": args.rounds,
        "formats": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_slides_") as tmp:
        pool = _tile_pool()
        t0 = time.perf_counter()
        paths = {
            "svs": write_svs(Path(tmp) / "slide.svs", args.side, pool),
            "dicom": write_dicom(Path(tmp) / "dicom", args.side, pool),
        }
        result["write_seconds"] = round(time.perf_counter() - t0, 2)
        for fmt, names in formats.items():
            path = paths[fmt]
            entry: dict[str, Any] = {
                "identical": _identical(names, path, _windows(args.side, "random", 5)),
                "passes": {},
            }
            for kind in ("random", "grid"):
                wins = _windows(args.side, kind, args.windows)
                best: dict[str, dict[str, float]] = {}
                for _ in range(args.rounds):
                    for name in names:
                        m = _measure(name, path, wins)
                        if name not in best or m["mpx_per_s"] > best[name]["mpx_per_s"]:
                            cpu = max(m["mpx_per_cpu_s"], best.get(name, m)["mpx_per_cpu_s"])
                            best[name] = {**m, "mpx_per_cpu_s": cpu}
                        elif m["mpx_per_cpu_s"] > best[name]["mpx_per_cpu_s"]:
                            best[name]["mpx_per_cpu_s"] = m["mpx_per_cpu_s"]
                ref = best["openslide"]["mpx_per_s"]
                entry["passes"][kind] = {
                    "windows": len(wins),
                    "contenders": best,
                    "ratio": {
                        n: round(best[n]["mpx_per_s"] / ref, 2) for n in names if n != "openslide"
                    },
                    "ratio_cpu": {
                        n: round(best[n]["mpx_per_cpu_s"] / best["openslide"]["mpx_per_cpu_s"], 2)
                        for n in names
                        if n != "openslide"
                    },
                }
            result["formats"][fmt] = entry
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out = bu.write_json(args.out, result)
    parts = []
    for fmt, entry in result["formats"].items():
        for kind, p in entry["passes"].items():
            ratios = ", ".join(
                f"{n} {r}x (CPU {p['ratio_cpu'][n]}x)" for n, r in p["ratio"].items()
            )
            parts.append(f"{fmt} {kind}: {ratios}")
    print(
        f"bench_slides: {args.side}² slide, 512² windows, tilenet vs OpenSlide Mpx/s: "
        + "; ".join(parts)
        + f" (identical: {all(e['identical'] for e in result['formats'].values())}) -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
