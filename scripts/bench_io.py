"""Benchmark tilenet's lazy readers: window read throughput and memory.

Makes (in a temporary directory) an 8192^2 RGB tiled TIFF with JPEG and one with deflate
compression (512^2 tiles), reads 512x512 windows through ``tilenet.io.open_image`` with
1..N threads, and reports Mpx/s for tile-aligned and random (unaligned, 4 tiles) windows.
Then, in a fresh process, reads windows from a 30000^2 RGB JPEG-tiled TIFF (built from
repeated pre-compressed tiles, so it is written in a second) and reports peak RSS.

    python scripts/bench_io.py --threads 2 --out bench_results/bench_io.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _benchutil import TILE, make_tiff  # scripts/ is on sys.path when run as a script

WIN = 512
_KINDS = ("random", "raster", "aligned")


def _windows(size: int, count: int, aligned: bool | None, seed: int) -> list[Any]:
    """Tile-aligned (1 distinct tile each), random (4 tiles each) or, for ``aligned=None``,
    raster order offset by half a tile (4 tiles each, shared with the neighbours, as tiled
    inference with a halo reads; the decoded-tile cache serves the shared ones)."""
    from tilenet.geometry import Window

    rng = np.random.default_rng(seed)
    if aligned is None:
        n = size // WIN - 1
        pos = [(r * WIN + WIN // 2, c * WIN + WIN // 2) for r in range(n) for c in range(n)]
        return [Window(y, x, WIN, WIN) for y, x in pos[:count]]
    if aligned:
        # Distinct tiles, so the decoded-tile cache never answers: pure decode throughput.
        n = size // WIN
        cells = rng.permutation(n * n)[:count]
        return [Window(int(c // n) * WIN, int(c % n) * WIN, WIN, WIN) for c in cells]
    ys = rng.integers(0, size - WIN, count)
    xs = rng.integers(0, size - WIN, count)
    return [Window(int(y), int(x), WIN, WIN) for y, x in zip(ys, xs, strict=True)]


def throughput(path: Path, *, threads: int, count: int, aligned: bool | None) -> dict[str, float]:
    from tilenet.io import open_image

    with open_image(path) as img:
        size = img.shape[0]
        img.read(_windows(size, 1, False, 99)[0])  # warm: open the level, file handle
        wins = _windows(size, count, aligned, seed=threads)
        count = len(wins)
        t0 = time.perf_counter()
        if threads == 1:
            for w in wins:
                img.read(w)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(img.read, wins))
        dt = time.perf_counter() - t0
    mpx = count * WIN * WIN / 1e6
    return {"windows": count, "seconds": round(dt, 4), "mpx_per_s": round(mpx / dt, 2)}


def _rss_child(path: str, count: int, queue: Any) -> None:
    from tilenet.io import open_image

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open_image(path) as img:
        size = img.shape[0]
        t0 = time.perf_counter()
        for w in _windows(size, count, aligned=False, seed=7):
            img.read(w)
        dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "seconds": dt})


def peak_rss(path: Path, count: int, side: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(str(path), count, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    h = w = side
    return {
        "image": f"{h}x{w}x3 uint8 jpeg tiles {TILE}",
        "image_mib_if_loaded": round(h * w * 3 / 2**20, 1),
        "windows": count,
        "rss_after_imports_mib": round(result["rss_before_mib"], 1),
        "peak_rss_mib": round(result["peak_rss_mib"], 1),
        "seconds": round(result["seconds"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="bench_results/bench_io.json", help="JSON result path")
    ap.add_argument("--threads", type=int, default=1, help="measure with 1..N reader threads")
    ap.add_argument("--size", type=int, default=8192, help="side of the throughput images")
    ap.add_argument("--windows", type=int, default=200, help="windows per measurement")
    ap.add_argument("--big", type=int, default=30000, help="side of the RSS image")
    args = ap.parse_args(argv)

    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "window": [WIN, WIN],
        "tile": [TILE, TILE],
        "throughput": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        big = make_tiff(Path(tmp) / "big.tif", args.big, distinct=8)
        result["memory"] = peak_rss(big, args.windows, args.big)
        big.unlink()
        for comp in ("jpeg", "zlib"):
            t0 = time.perf_counter()
            p = make_tiff(Path(tmp) / f"{comp}.tif", args.size, compression=comp)
            made = time.perf_counter() - t0
            entry: dict[str, Any] = {
                "image": f"{args.size}x{args.size}x3 uint8",
                "file_mib": round(p.stat().st_size / 2**20, 1),
                "write_seconds": round(made, 2),
            }
            for threads in range(1, args.threads + 1):
                for aligned, name in ((True, "aligned"), (False, "random"), (None, "raster")):
                    key = f"{name}_threads{threads}"
                    entry[key] = throughput(p, threads=threads, count=args.windows, aligned=aligned)
            result["throughput"]["deflate" if comp == "zlib" else comp] = entry
            p.unlink()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    tp = result["throughput"]
    mem = result["memory"]
    print(
        "bench_io: 512^2 windows, 1 thread, Mpx/s random/raster/aligned: jpeg "
        + "/".join(str(tp["jpeg"][f"{k}_threads1"]["mpx_per_s"]) for k in _KINDS)
        + ", deflate "
        + "/".join(str(tp["deflate"][f"{k}_threads1"]["mpx_per_s"]) for k in _KINDS)
        + f"; peak RSS {mem['peak_rss_mib']} MiB "
        f"reading {mem['windows']} windows of a {args.big}^2 RGB image "
        f"({mem['image_mib_if_loaded']} MiB if loaded) -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
