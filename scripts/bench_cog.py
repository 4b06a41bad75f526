"""Cost of the Cloud-Optimized GeoTIFF outputs of ``tilenet infer`` on a GeoTIFF, on CPU.

Makes one RGB GeoTIFF of ``--side``² (written by GDAL through rasterio, window by window, in
UTM zone 33N) and a small checkpoint, then runs, each in a fresh process
(``python -m tilenet infer IMG --model CKPT --out DIR --device cpu`` at the default tile),
side by side in one run:

* ``no_cog``: ``--outputs probabilities,instances,preview`` (no classes.tif);
* ``default``: the default outputs (``probabilities,classes,instances,preview``), which for a
  georeferenced input include ``classes.tif``;
* ``with_probabilities_tif``: the default outputs plus ``probabilities_tif``.

Reports for each the wall seconds of the process and of the run (``summary.json``'s
``timings.total_s``), the seconds spent writing the COGs (``timings.cog_s``, timed inside
the run) and their share of the run (target: at most 25 %), and the run-time difference to
``no_cog``. Writes JSON (``--out``) and prints one line.

    python scripts/bench_cog.py --side 8192 --out docs/bench_cog.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu

RUNS = {
    "no_cog": "probabilities,instances,preview",
    "default": "probabilities,classes,instances,preview",
    "with_probabilities_tif": "probabilities,classes,instances,preview,probabilities_tif",
}


def make_geotiff(path: Path, side: int, *, block: int = 1024) -> Path:
    """A side x side RGB GeoTIFF (512² tiles, deflate), written window by window by GDAL."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tmp = path.with_name(f".{path.name}.tmp")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500_000.0, 4_600_000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "bigtiff": "if_safer",
    }
    with rasterio.open(tmp, "w", **profile) as dst:
        for y in range(0, side, block):
            for x in range(0, side, block):
                h, w = min(block, side - y), min(block, side - x)
                yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float32)
                base = np.stack(
                    [
                        140 + 90 * np.sin(yy / 37.0) * np.cos(xx / 23.0),
                        120 + 80 * np.cos((xx + yy) / 51.0),
                        150 + 60 * np.sin(xx / 17.0),
                    ]
                )
                data = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                dst.write(data, window=Window(x, y, w, h))
    tmp.replace(path)
    return path


def _run(img: Path, ckpt: Path, out: Path, outputs: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tilenet", "infer", str(img), "--model", str(ckpt)]
    cmd += ["--out", str(out), "--device", "cpu", "--quiet", "--outputs", outputs]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    t = summary["timings"]
    return {
        "outputs": outputs,
        "process_s": round(wall, 2),
        "total_s": t["total_s"],
        "tiles_s": t["tiles_s"],
        "finalize_s": t["finalize_s"],
        "cog_s": t["cog_s"],
        "cog_share": round(t["cog_s"] / t["total_s"], 4),
        "tile": summary["tile"],
        "files": sorted(p.name for p in out.iterdir() if p.suffix == ".tif"),
        "loadavg_after": [round(v, 2) for v in __import__("os").getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--side", type=int, default=8192, help="image side (default 8192)")
    ap.add_argument("--model", default="unet", help="registry model (default unet)")
    ap.add_argument("--model-kwargs", default='{"depth": 3, "base": 4}', help="JSON kwargs")
    ap.add_argument("--target", type=float, default=0.25, help="max COG share (default 0.25)")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--out", default="bench_results/bench_cog.json", help="JSON output")
    opt = ap.parse_args(argv)

    work = Path(opt.workdir or tempfile.mkdtemp(prefix="bench_cog-"))
    work.mkdir(parents=True, exist_ok=True)
    img = make_geotiff(work / f"scene_{opt.side}.tif", opt.side)
    ckpt = bu.make_checkpoint(work / "cog.pt", opt.model, json.loads(opt.model_kwargs))
    machine = bu.machine_info()
    runs = {name: _run(img, ckpt, work / name, outputs) for name, outputs in RUNS.items()}
    base = runs["no_cog"]["total_s"]
    for r in runs.values():
        r["over_no_cog_s"] = round(r["total_s"] - base, 2)
    worst = max(runs["default"]["cog_share"], runs["with_probabilities_tif"]["cog_share"])
    result: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "side": opt.side,
            "model": opt.model,
            "model_kwargs": json.loads(opt.model_kwargs),
            "target_cog_share": opt.target,
        },
        "runs": runs,
        "worst_cog_share": worst,
        "meets_target": worst <= opt.target,
    }
    bu.write_json(opt.out, result)
    d, p = runs["default"], runs["with_probabilities_tif"]
    print(
        f"bench_cog {opt.side}² (tile {d['tile']}): run {base:.1f} s without COGs, "
        f"{d['total_s']:.1f} s with classes.tif (COG {d['cog_s']:.1f} s = "
        f"{100 * d['cog_share']:.1f} %), {p['total_s']:.1f} s with probabilities.tif too "
        f"(COGs {p['cog_s']:.1f} s = {100 * p['cog_share']:.1f} %); "
        f"target <= {100 * opt.target:.0f} %: {'met' if result['meets_target'] else 'MISSED'}"
    )
    if not opt.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
