"""Peak RSS and throughput of tilenet inference as the image grows (memory must stay flat).

For each side (default 8192, 16384, 32768) a synthetic RGB JPEG-tiled TIFF (512² tiles) is
written tile by tile from a few pre-encoded tiles (seconds even at 32768², 1 Gpx; decoding
cost per tile is that of a real tile), then ``tilenet.infer_image`` runs on it in a fresh
subprocess that reports its own peak RSS (``VmHWM``). A small fast model is the default
(``tiny``, width 2; stride 2) so that 32768² finishes in minutes on a 2-core CPU: memory is
what is measured here; for model-bound throughput see bench_peers.py. Outputs: the class map
(OME-Zarr + pyramids); ``--outputs probabilities,classes`` adds the float16 probabilities.

    python scripts/bench_scaling.py                       # 8192², 16384², 32768²
    python scripts/bench_scaling.py --quick               # 1024², 2048² smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu


def child(a: dict[str, Any]) -> dict[str, Any]:
    # What infer_image imports lazily is imported before the clock (torchvision alone takes
    # seconds): a one-off per process, not a per-image cost.
    import omegaconf  # noqa: F401
    import zarr  # noqa: F401

    import tilenet.engine.infer
    import tilenet.io
    import tilenet.io.writers
    import tilenet.models  # noqa: F401  (imported before the clock)
    from tilenet.engine.infer import infer_image

    if a.get("allocator") == "keep":
        # Experiment: glibc never mmaps and never trims, and the engine's
        # malloc_trim is off: freed buffers all stay mapped and are reused.
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 1 << 40)  # M_TRIM_THRESHOLD
        a["opts"]["heap"] = "system"  # the engine leaves glibc's settings alone
    if a.get("allocator") == "glibc":
        a["opts"]["heap"] = "trim"  # glibc's defaults, the engine's HeapGuard still on
    before = bu.peak_rss_bytes()
    t0 = time.perf_counter()
    s = infer_image(a["image"], a["ckpt"], a["out"], **a["opts"])
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "rss_after_imports_mb": round(before / 1e6, 1),
        "tiles": s["tiles"],
        "halo": s["halo"],
        "timings": s["timings"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="8192,16384,32768", help="image sides (px)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--model-kwargs", default='{"width": 2}', help="JSON kwargs")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--mode", default="crop", choices=("crop", "gaussian", "linear"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--outputs", default="classes", help="comma-separated infer outputs")
    ap.add_argument("--heap", default="reuse", choices=("reuse", "flat"), help="infer --heap")
    ap.add_argument(
        "--allocator",
        default="tilenet",
        choices=("tilenet", "glibc", "keep"),
        help="tilenet: the engine as it is (memory kept for reuse, trimmed every 8 batches); glibc: "
        "glibc's defaults with the engine's trimming; keep: experiment, freed memory stays "
        "mapped (M_MMAP_MAX=0, no trimming)",
    )
    ap.add_argument("--workdir", default=None, help="images and outputs (default: a temp dir)")
    ap.add_argument("--keep-images", action="store_true", help="keep the TIFFs in --workdir")
    ap.add_argument("--out", default="bench_results/bench_scaling.json")
    ap.add_argument("--quick", action="store_true", help="1024², 2048² smoke run")
    opt = ap.parse_args(argv)
    if opt.child:
        bu.child_report(child(json.loads(opt.child)))
        return 0
    if opt.quick:
        opt.sizes, opt.tile = "1024,2048", 256
    sizes = [int(v) for v in opt.sizes.split(",")]
    tmp = None if opt.workdir else tempfile.mkdtemp(prefix="bench_scaling-")
    work = Path(opt.workdir or tmp)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    kwargs = json.loads(opt.model_kwargs)
    ckpt = bu.make_checkpoint(work / "scaling.pt", opt.model, kwargs)
    opts = {
        "tile": opt.tile,
        "mode": opt.mode,
        "batch": opt.batch,
        "device": "cpu",
        "readers": opt.readers,
        "outputs": [o.strip() for o in opt.outputs.split(",") if o.strip()],
        "heap": opt.heap,
    }
    result: dict[str, Any] = {
        "machine": bu.machine_info(),
        "model": {"name": opt.model, "kwargs": kwargs},
        "settings": {
            **opts,
            "allocator": opt.allocator,
            "image": "RGB uint8, JPEG-tiled TIFF (512² tiles)",
        },
        "sizes": [],
    }
    try:
        for side in sizes:
            t0 = time.perf_counter()
            img = bu.make_tiff(work / f"scaling_{side}.tif", side, distinct=16)
            made = time.perf_counter() - t0
            out = work / f"out_{side}"
            shutil.rmtree(out, ignore_errors=True)
            r = bu.run_child(
                [
                    __file__,
                    "--child",
                    json.dumps(
                        {
                            "image": str(img),
                            "ckpt": str(ckpt),
                            "out": str(out),
                            "opts": opts,
                            "allocator": opt.allocator,
                        }
                    ),
                ]
            )
            shutil.rmtree(out, ignore_errors=True)
            if not opt.keep_images:
                img.unlink()
            mpx = side * side / 1e6
            row = {
                "side": side,
                "megapixels": round(mpx, 1),
                "image_write_s": round(made, 1),
                "wall_s": round(r["wall_s"], 2),
                "mpx_per_s": round(mpx / r["wall_s"], 2),
                "tile_phase_mpx_per_s": round(mpx / r["timings"]["tiles_s"], 2),
                "peak_rss_mb": r["peak_rss_mb"],
                "rss_after_imports_mb": r["rss_after_imports_mb"],
                "cpu_s": r["cpu_s"],
                "tiles": r["tiles"],
                "timings": r["timings"],
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
            result["sizes"].append(row)
            print(
                f"{side}²: {row['wall_s']} s, {row['mpx_per_s']} Mpx/s, "
                f"peak RSS {row['peak_rss_mb']} MB (load {row['loadavg_1min']})",
                flush=True,
            )
            bu.write_json(opt.out, result)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = result["sizes"]
    growth = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1, 4)
    result["rss_growth"] = growth
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    bu.write_json(opt.out, result)
    print(
        "bench_scaling: "
        + ", ".join(f"{r['side']}² {r['peak_rss_mb']} MB {r['mpx_per_s']} Mpx/s" for r in rows)
        + f"; peak RSS growth {rows[0]['side']}²->{rows[-1]['side']}²: {growth * 100:+.1f}% -> {opt.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
