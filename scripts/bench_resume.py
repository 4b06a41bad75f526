"""Resume of a plain ``tilenet infer`` killed with SIGKILL: rerun time against a full run.

Makes one JPEG-tiled RGB TIFF of ``--side``² and a checkpoint, then, each in a fresh process
(``python -m tilenet infer IMG --model CKPT --out DIR``), side by side in one run:

* ``full``: an uninterrupted run;
* ``killed``: the same command, sent SIGKILL once ``--kill-at`` of its bands are recorded;
* ``rerun``: the same command again into the killed run's directory.

Reports the wall seconds of each, the rerun/full ratio (the target: clearly below 1, about
1 - kill_at), the bands kept, whether every output array equals the full run's bit for bit,
and whether any partial data is left. Writes JSON (``--out``) and prints one line.

    python scripts/bench_resume.py --side 8192
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu


def _cmd(img: Path, ckpt: Path, out: Path, opt: argparse.Namespace) -> list[str]:
    return [
        *(sys.executable, "-m", "tilenet", "infer", str(img), "--model", str(ckpt)),
        *("--out", str(out), "--device", "cpu", "--quiet", "--tile", str(opt.tile)),
        *("--region-tiles", str(opt.region_tiles)),
    ]


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _same(a: Path, b: Path) -> bool:
    """Every array of every zarr output equal, compared block by block (bounded memory)."""
    import numpy as np
    import zarr

    from tilenet.geometry import iter_blocks

    for name in ("probabilities.ome.zarr", "classes.ome.zarr", "instances.ome.zarr"):
        ga, gb = zarr.open_group(a / name, mode="r"), zarr.open_group(b / name, mode="r")
        if sorted(ga.array_keys()) != sorted(gb.array_keys()):
            return False
        for k in ga.array_keys():
            x, y = ga[k], gb[k]
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            for win in iter_blocks(x.shape[-2:], 2048):
                sl = (..., slice(win.y, win.y1), slice(win.x, win.x1))
                if np.asarray(x[sl]).tobytes() != np.asarray(y[sl]).tobytes():
                    return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--side", type=int, default=8192, help="image side (default 8192)")
    ap.add_argument("--tile", type=int, default=1024, help="--tile for infer (default 1024)")
    ap.add_argument("--region-tiles", type=int, default=16, help="tiles per band (default 16)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of bands (default 0.5)")
    ap.add_argument("--model", default="unet", help="registry model (default unet)")
    ap.add_argument("--model-kwargs", default='{"depth": 3, "base": 4}', help="JSON kwargs")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--out", default="bench_results/bench_resume.json", help="JSON output")
    opt = ap.parse_args(argv)

    work = Path(opt.workdir or tempfile.mkdtemp(prefix="bench_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    img = bu.make_tiff(work / f"resume_{opt.side}.tif", opt.side)
    ckpt = bu.make_checkpoint(work / "resume.pt", opt.model, json.loads(opt.model_kwargs))

    from tilenet.engine.checkpoint import load_model
    from tilenet.engine.infer import bands_of, resolve_options
    from tilenet.engine.tiles import plan_grid

    spec = load_model(ckpt)[1]
    grid, _ = plan_grid((opt.side, opt.side), spec, resolve_options({"tile": opt.tile}))
    n_bands = len(bands_of(*grid.counts, opt.region_tiles))
    kill_after = max(1, min(n_bands - 1, round(opt.kill_at * n_bands)))

    full_s = _timed(_cmd(img, ckpt, work / "full", opt))
    out = work / "resumed"
    markers = out / ".regions"
    t0 = time.perf_counter()
    proc = subprocess.Popen(_cmd(img, ckpt, out, opt), stdout=subprocess.DEVNULL)
    try:
        while len(list(markers.glob("region-*.json"))) < kill_after:
            if proc.poll() is not None:
                raise SystemExit("the run ended before it could be killed; use a larger --side")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_s = time.perf_counter() - t0
    kept = len(list(markers.glob("region-*.json")))
    rerun_s = _timed(_cmd(img, ckpt, out, opt))
    summary = json.loads((out / "summary.json").read_text())
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    result: dict[str, Any] = {
        "machine": bu.machine_info(),
        "settings": {
            "side": opt.side,
            "tile": opt.tile,
            "region_tiles": opt.region_tiles,
            "model": opt.model,
            "model_kwargs": json.loads(opt.model_kwargs),
            "tiles": len(grid),
            "bands": n_bands,
        },
        "full_s": round(full_s, 2),
        "killed_after_s": round(killed_s, 2),
        "bands_kept": kept,
        "rerun_s": round(rerun_s, 2),
        "rerun_over_full": round(rerun_s / full_s, 3),
        "regions_resumed": summary["regions_resumed"],
        "identical": _same(work / "full", out),
        "leftovers": leftovers,
    }
    bu.write_json(opt.out, result)
    print(
        f"bench_resume {opt.side}²: full {full_s:.1f} s, killed after {killed_s:.1f} s "
        f"({kept}/{n_bands} bands kept), rerun {rerun_s:.1f} s = "
        f"{result['rerun_over_full']:.2f}x full; identical={result['identical']}, "
        f"leftovers={leftovers or 'none'}"
    )
    if not opt.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["identical"] and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
