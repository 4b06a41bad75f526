"""Benchmark tiled inference: tilenet end to end vs the raw forward pass, and peak RSS.

Side by side in one run, on the same tiles (the read windows of the same grid, same batch
size, same model and device):

* ``raw``: only ``model(x)`` on pre-made batches already in memory (channels_last, the same
  autocast), i.e. the best a tiled pipeline could do;
* ``tilenet``: :func:`tilenet.infer_image` end to end: decode + normalise in reader threads,
  batches to the model, softmax, stitching, writing OME-Zarr in the background thread. Two
  figures: the tile phase (``tiles_s``), and the whole call including the pyramids and the
  OME-TIFF (``total_s``).

Raw is timed before and after tilenet and averaged, so drift on a shared machine affects both.
Peak RSS: ``infer_image`` runs in a fresh process per image size (tiny model, crop mode), and
reports its own peak RSS; it must stay flat as the image grows.

    python scripts/bench_infer.py --size 2048 --model unet --tile 512
    python scripts/bench_infer.py --rss-sizes 4096,8192,16384 --skip-throughput
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_image(path: Path, side: int, *, tile: int = 512) -> None:
    """A side x side RGB JPEG-tiled TIFF of smooth structure + noise, written tile by tile."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)

    def tiles() -> Any:
        from tilenet.geometry import iter_blocks

        # Full tiles (TIFF tiles are padded at the edges): only the origins are used.
        for win in iter_blocks((side, side), tile):
            y, x = yy + win.y, xx + win.x
            base = np.stack(
                [
                    140 + 90 * np.sin(y / 37.0) * np.cos(x / 23.0),
                    120 + 80 * np.cos((x + y) / 51.0),
                    150 + 60 * np.sin(x / 17.0),
                ],
                axis=-1,
            )
            noise = rng.normal(0, 12, base.shape)
            yield np.clip(base + noise, 0, 255).astype(np.uint8)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        bigtiff=side * side * 3 > 2**31,
    )


def make_checkpoint(
    path: Path, name: str, num_classes: int = 3, kwargs: dict[str, Any] | None = None
) -> Path:
    import torch

    from tilenet.engine.checkpoint import save_checkpoint
    from tilenet.models import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=num_classes, **(kwargs or {}))
    spec = ModelSpec.from_model(model, mean=[128.0] * 3, std=[64.0] * 3)
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


def raw_forward(ckpt: Path, shape: tuple[int, int], opts: dict[str, Any]) -> dict[str, float]:
    """Seconds for the model alone over batches shaped like the grid's read windows."""
    import torch

    from tilenet.engine.checkpoint import load_model
    from tilenet.engine.infer import resolve_options
    from tilenet.engine.predictor import prepare_model
    from tilenet.engine.tiles import batch_shapes, plan_grid
    from tilenet.runtime import autocast, heap_policy, resolve_device

    cfg = resolve_options(opts)
    device = resolve_device(cfg.device)
    model, spec = load_model(ckpt, device=device)
    model = prepare_model(model)  # what the engine runs: eval, BatchNorm folded, channels_last
    grid, _ = plan_grid(shape, spec, cfg)
    batches = batch_shapes(grid, cfg)  # the engine's order and grouping
    cache: dict[tuple[int, int, int], torch.Tensor] = {}
    # The engine's allocator setting too, so only the pipeline differs.
    with heap_policy(cfg.heap), torch.inference_mode(), autocast(device, cfg.precision):
        b, (h, w) = batches[0]
        model(torch.randn(b, 3, h, w, device=device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for b, (h, w) in batches:
            key = (b, h, w)
            if key not in cache:
                cache[key] = torch.randn(b, 3, h, w, device=device).to(
                    memory_format=torch.channels_last
                )
            model(cache[key])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tiles": len(grid), "seconds": dt, "cpu_s": cpu, "tiles_per_s": len(grid) / dt}


_CHILD = """
import json, resource, sys, time
import torch, tilenet.models, tilenet.io, tilenet.outputs.instances, zarr, tifffile
from tilenet.engine.infer import infer_image
img, ckpt, out, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
c0 = time.process_time()
s = infer_image(img, ckpt, out, **opts)
cpu = time.process_time() - c0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": rss, "cpu_s": cpu, "summary": s}))
"""


def run_child(img: Path, ckpt: Path, out: Path, opts: dict[str, Any]) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(img), str(ckpt), str(out), json.dumps(opts)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="throughput image side (px)")
    ap.add_argument("--model", default="unet", help="registry model for throughput")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rss-sizes", default="2048,4096,8192", help="image sides for peak RSS")
    ap.add_argument("--rss-model", default="tiny")
    ap.add_argument(
        "--rss-model-kwargs", default='{"width": 2}', help="JSON kwargs of the RSS model"
    )
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--workdir", default=None, help="where images/outputs go (default: temp)")
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args(argv)

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_infer-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
    }
    opts = {
        "tile": args.tile,
        "batch": args.batch,
        "device": args.device,
        "precision": args.precision,
        "outputs": ["probabilities", "classes"],
    }
    if not args.skip_throughput:
        img = work / f"bench_{args.size}.tif"
        if not img.exists():
            write_image(img, args.size)
        ckpt = make_checkpoint(work / f"{args.model}.pt", args.model)
        shape = (args.size, args.size)
        r1 = raw_forward(ckpt, shape, opts)
        child = run_child(img, ckpt, work / "out", opts)
        r2 = raw_forward(ckpt, shape, opts)
        s = child["summary"]
        raw_s = (r1["seconds"] + r2["seconds"]) / 2
        n = s["tiles"]
        results["throughput"] = {
            "model": args.model,
            "image": args.size,
            "tile": args.tile,
            "halo": s["halo"],
            "batch": args.batch,
            "tiles": n,
            "raw_s": [round(r1["seconds"], 2), round(r2["seconds"], 2)],
            "raw_tiles_per_s": round(n / raw_s, 3),
            "tilenet_tiles_s": s["timings"]["tiles_s"],
            "tilenet_total_s": s["timings"]["total_s"],
            "tilenet_tiles_per_s": round(n / s["timings"]["tiles_s"], 3),
            "ratio_tile_phase": round(raw_s / s["timings"]["tiles_s"], 3),
            "ratio_end_to_end": round(raw_s / s["timings"]["total_s"], 3),
            # CPU seconds are robust to other processes on a shared machine (wall is not).
            "raw_cpu_s": round((r1["cpu_s"] + r2["cpu_s"]) / 2, 2),
            "tilenet_tiles_cpu_s": s["timings"]["tiles_cpu_s"],
            "tilenet_total_cpu_s": round(child["cpu_s"], 2),
            "ratio_cpu_tile_phase": round(
                (r1["cpu_s"] + r2["cpu_s"]) / 2 / s["timings"]["tiles_cpu_s"], 3
            ),
            "peak_rss_mb": round(child["peak_rss"] / 1e6, 1),
            "timings": s["timings"],
        }
        t = results["throughput"]
        print(
            f"throughput {args.model} {args.size}^2 tile {args.tile} ({n} tiles): raw "
            f"{t['raw_tiles_per_s']} tiles/s, tilenet {t['tilenet_tiles_per_s']} tiles/s "
            f"(tile phase {t['ratio_tile_phase']}x raw, end to end incl. pyramids+tiff "
            f"{t['ratio_end_to_end']}x; tile-phase CPU time {t['ratio_cpu_tile_phase']}x), peak RSS {t['peak_rss_mb']} MB",
            flush=True,
        )
    rss = []
    sizes = [int(v) for v in args.rss_sizes.split(",") if v.strip()]
    if sizes:
        ckpt = make_checkpoint(
            work / f"rss_{args.rss_model}.pt",
            args.rss_model,
            kwargs=json.loads(args.rss_model_kwargs),
        )
    for side in sizes:
        img = work / f"rss_{side}.tif"
        if not img.exists():
            write_image(img, side)
        ropts = {**opts, "tile": 1024, "batch": 2}
        child = run_child(img, ckpt, work / f"rss_out_{side}", ropts)
        s = child["summary"]
        rss.append(
            {
                "side": side,
                "peak_rss_mb": round(child["peak_rss"] / 1e6, 1),
                "tiles": s["tiles"],
                "total_s": s["timings"]["total_s"],
                "tiles_per_s": s["tiles_per_s"],
            }
        )
        print(
            f"rss {side}^2 ({args.rss_model}, tile 1024): peak RSS {rss[-1]['peak_rss_mb']} MB, "
            f"{s['tiles']} tiles, {s['timings']['total_s']} s",
            flush=True,
        )
    results["rss"] = rss
    results["bench_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
