"""Side-by-side: tilenet vs MONAI vs pytorch-toolbelt vs a whole-image forward pass.

Every contender gets the same checkpoint weights, the same JPEG-tiled RGB TIFF, the same
normalisation ((x - 128) / 64), tile/ROI size, overlap, batch and dtype (fp32), and runs in
a fresh subprocess that reports its own peak RSS. Contenders, run interleaved per round:

* ``model_crop`` / ``model_gauss``: the model alone (``model(x)``, inference mode), prepared
  as the engine prepares it (``tilenet.engine.predictor.prepare_model``: BatchNorm folded into the
  convolutions, channels_last) under the engine's allocator setting
  (``tilenet.runtime.heap_policy``), on random batches shaped and grouped exactly
  like the engine's (``tilenet.engine.tiles.batch_shapes``): the numerator of tilenet's pipeline
  efficiency;
* ``tilenet_crop``: ``infer_image(mode="crop")`` at the default tile (1024, the largest
  read window: the engine fits the grid below it) with the automatic halo (exact);
  ``tilenet_gauss``: ``mode="gaussian"`` at ``--tile`` and ``--overlap``. Both end to end: lazy read, model, stitching, float32 probabilities and a
  class map written to OME-Zarr with pyramids;
* ``monai``: ``monai.inferers.sliding_window_inference`` (gaussian, ROI ``--tile``, same
  overlap and batch) on the whole image loaded into a tensor, predictor = softmax(model);
* ``toolbelt``: pytorch-toolbelt ``ImageSlicer`` + ``TileMerger`` (pyramid weights, step =
  tilenet's gaussian step) on the whole image in memory;
* ``whole``: one forward pass over the whole image (zero-padded after normalisation to the
  stride), only up to ``--whole-max``: the reference for the max abs difference.

Time is wall time from opening the image to the probabilities being complete (tilenet also
writes them to disk; MONAI/toolbelt/whole keep them in RAM and are not charged for saving
them). The max abs difference of the softmax probabilities from ``whole`` is computed in
row strips afterwards. MONAI and pytorch-toolbelt come from the ``bench`` extra
(``pip install -e .[bench]``).

    python scripts/bench_peers.py        # 2048², 4096² (2 rounds), 8192²: ~10 min on 2 idle cores
    python scripts/bench_peers.py --sizes 4096 --contenders monai,monai_cl,tilenet_gauss
    python scripts/bench_peers.py --quick            # 256² smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu

ALL = (
    "model_crop",
    "tilenet_crop",
    "monai",
    "model_gauss",
    "tilenet_gauss",
    "toolbelt",
    "whole",
    "monai_cl",
)
#: Run by default (monai_cl, MONAI with a channels_last model, on request).
DEFAULT = ALL[:-1]


# -- children -------------------------------------------------------------------------------
def _load(ckpt: str, device: str = "cpu") -> tuple[Any, Any]:
    from tilenet.engine.checkpoint import load_model

    return load_model(ckpt, device=device)


def _autocast(a: dict[str, Any]) -> Any:
    """bf16 autocast on ``a["device"]`` when ``a["precision"]`` asks for it."""
    import contextlib

    import torch

    if a.get("precision", "fp32") == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=a["device"].split(":")[0], dtype=torch.bfloat16)


def _sync(a: dict[str, Any]) -> None:
    import torch

    if a.get("device", "cpu").startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_report(a: dict[str, Any], sampler: Any) -> dict[str, Any]:
    """GPU busy fraction (nvidia-smi samples) and peak GPU memory; empty on CPU."""
    import torch

    if not a.get("device", "cpu").startswith("cuda"):
        return {}
    return {
        "gpu_busy_pct": sampler.mean(),
        "gpu_peak_mem_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1),
    }


def _read_normalised(img: str) -> np.ndarray:
    """The whole image as normalised float32 HWC (what the in-RAM contenders start from)."""
    import tifffile

    a = tifffile.imread(img)
    out = np.empty(a.shape, np.float32)
    np.subtract(a, 128.0, out=out, dtype=np.float32)
    out *= 1.0 / 64.0
    return out


def _save(out: str, probs: Any) -> None:
    """Save (K, H, W) probabilities for the diff (not timed)."""
    np.save(out, np.ascontiguousarray(np.asarray(probs, dtype=np.float32)))


def child_tilenet(a: dict[str, Any]) -> dict[str, Any]:
    # Import what infer_image imports lazily before the clock starts (the other contenders
    # import their libraries before it too).
    import omegaconf  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    import tilenet.io
    import tilenet.io.writers
    import tilenet.models  # noqa: F401
    from tilenet.engine.infer import infer_image

    opts = {
        "tile": a["tile"],
        "mode": a["mode"],
        "overlap": a["overlap"],
        "batch": a["batch"],
        "device": a["device"],
        "precision": a.get("precision", "fp32"),
        "readers": a["readers"],
        "outputs": ["probabilities"],
        "probabilities_dtype": "float32",
    }
    with bu.GpuSampler(enabled=a["device"].startswith("cuda")) as gpu:
        t0, c0 = time.perf_counter(), time.process_time()
        s = infer_image(a["image"], a["ckpt"], a["out"], **opts)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        **_gpu_report(a, gpu),
        "wall_s": wall,
        "cpu_timed_s": cpu,
        "summary": s,
        "tiles": s["tiles"],
        "halo": s["halo"],
    }


def child_model(a: dict[str, Any]) -> dict[str, Any]:
    """The model alone on batches shaped like tilenet's tiles (same grouping, same batch)."""
    import tifffile
    import torch

    from tilenet.engine.infer import resolve_options
    from tilenet.engine.predictor import prepare_model
    from tilenet.engine.tiles import batch_shapes, plan_grid
    from tilenet.runtime import heap_policy

    dev = a.get("device", "cpu")
    model, spec = _load(a["ckpt"], dev)
    model = prepare_model(model)  # what the engine runs: eval, BatchNorm folded, channels_last
    cfg = resolve_options(
        {"tile": a["tile"], "mode": a["mode"], "overlap": a["overlap"], "batch": a["batch"]}
    )
    with tifffile.TiffFile(a["image"]) as tf:
        shape = tf.pages[0].shape[:2]
    grid, _ = plan_grid(shape, spec, cfg)
    batches = batch_shapes(grid, cfg)  # the engine's order and grouping
    cache: dict[tuple[int, int, int], Any] = {}
    px = 0

    def make(b: int, h: int, w: int) -> Any:
        return torch.randn(b, 3, h, w, device=dev).to(memory_format=torch.channels_last)

    # The engine's allocator setting too, so only the pipeline differs.
    with heap_policy(cfg.heap), torch.inference_mode(), _autocast(a):
        b, (h, w) = batches[0]
        model(make(b, h, w))  # warm-up
        _sync(a)
        t0, c0 = time.perf_counter(), time.process_time()
        for b, (h, w) in batches:
            if (b, h, w) not in cache:
                cache[(b, h, w)] = make(b, h, w)
            model(cache[(b, h, w)])
            px += b * h * w
        _sync(a)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_timed_s": cpu, "tiles": len(grid), "model_px": px}


def child_monai(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from monai.inferers import sliding_window_inference

    dev = a.get("device", "cpu")
    model, _ = _load(a["ckpt"], dev)
    if a.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x).float(), dim=1)

    t0, c0 = time.perf_counter(), time.process_time()
    x = torch.from_numpy(_read_normalised(a["image"])).permute(2, 0, 1)[None].contiguous()
    # On a GPU the windows run there and the output stays in host RAM (as for a slide).
    with torch.inference_mode(), _autocast(a), bu.GpuSampler(enabled=dev != "cpu") as gpu:
        y = sliding_window_inference(
            x,
            roi_size=(a["tile"], a["tile"]),
            sw_batch_size=a["batch"],
            predictor=predictor,
            overlap=a["overlap"],
            mode="gaussian",
            sw_device=dev,
            device="cpu",
        )
        _sync(a)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if a.get("save"):
        _save(a["save"], y[0])
    return {**_gpu_report(a, gpu), "wall_s": wall, "cpu_timed_s": cpu}


def child_toolbelt(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from pytorch_toolbelt.inference.tiles import ImageSlicer, TileMerger

    dev = a.get("device", "cpu")
    model, _ = _load(a["ckpt"], dev)
    t0, c0 = time.perf_counter(), time.process_time()
    img = _read_normalised(a["image"])
    slicer = ImageSlicer(img.shape, tile_size=a["tile"], tile_step=a["step"], weight="pyramid")
    tiles = slicer.split(img)
    merger = TileMerger(slicer.target_shape, channels=a["classes"], weight=slicer.weight)
    with torch.inference_mode(), _autocast(a):
        for i in range(0, len(tiles), a["batch"]):
            batch = np.stack(tiles[i : i + a["batch"]]).transpose(0, 3, 1, 2)
            pred = torch.softmax(model(torch.from_numpy(batch).to(dev)).float(), dim=1)
            merger.integrate_batch(pred.cpu(), slicer.crops[i : i + a["batch"]])
    merged = merger.merge().permute(1, 2, 0).numpy()
    probs = slicer.crop_to_orignal_size(merged)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if a.get("save"):
        _save(a["save"], probs.transpose(2, 0, 1))
    return {"wall_s": wall, "cpu_timed_s": cpu, "tiles": len(tiles)}


def child_whole(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    dev = a.get("device", "cpu")
    model, spec = _load(a["ckpt"], dev)
    model = model.to(memory_format=torch.channels_last)
    s = spec.stride
    t0, c0 = time.perf_counter(), time.process_time()
    img = _read_normalised(a["image"])
    h, w = img.shape[:2]
    x = torch.zeros(1, 3, -(-h // s) * s, -(-w // s) * s)
    x[0, :, :h, :w] = torch.from_numpy(img).permute(2, 0, 1)
    del img
    with torch.inference_mode(), _autocast(a):
        x = x.to(dev).to(memory_format=torch.channels_last)
        y = torch.softmax(model(x).float(), dim=1)[0, :, :h, :w].cpu()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if a.get("save"):
        _save(a["save"], y)
    return {"wall_s": wall, "cpu_timed_s": cpu}


CHILDREN = {
    "tilenet": child_tilenet,
    "model": child_model,
    "monai": child_monai,
    "toolbelt": child_toolbelt,
    "whole": child_whole,
}


# -- the parent -----------------------------------------------------------------------------
def _max_abs_diff(a_path: Path, ref_path: Path, strip: int = 512) -> float:
    """Max |a - ref| over (K, H, W) probabilities, read in row strips (.npy or OME-Zarr)."""
    ref = np.load(ref_path, mmap_mode="r")
    if a_path.suffix == ".npy":
        a: Any = np.load(a_path, mmap_mode="r")
    else:
        import zarr

        a = zarr.open_group(a_path, mode="r")["0"]
    worst = 0.0
    from tilenet.geometry import spans

    for y0, y1 in spans(ref.shape[1], strip):
        d = np.abs(np.asarray(a[:, y0:y1], np.float32) - ref[:, y0:y1])
        worst = max(worst, float(d.max()))
    return worst


def _run(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    return bu.run_child([__file__, "--child", kind, json.dumps(args)])


def bench_size(
    side: int, ckpt: Path, spec: Any, work: Path, opt: argparse.Namespace
) -> dict[str, Any]:
    from tilenet.engine.infer import resolve_options
    from tilenet.engine.tiles import plan_grid

    img = bu.make_tiff(work / f"peers_{side}.tif", side)
    gcfg = resolve_options({"tile": opt.tile, "mode": "gaussian", "overlap": opt.overlap})
    _, halo = plan_grid((side, side), spec, gcfg)
    step = opt.tile - 2 * halo
    common = {
        "image": str(img),
        "ckpt": str(ckpt),
        "batch": opt.batch,
        "device": opt.device,
        "precision": opt.precision,
    }
    runs: dict[str, dict[str, Any]] = {
        "model_crop": {**common, "tile": opt.crop_tile, "mode": "crop", "overlap": 0.0},
        "tilenet_crop": {
            **common,
            "tile": opt.crop_tile,
            "mode": "crop",
            "overlap": 0.0,
            "readers": opt.readers,
        },
        "monai": {**common, "tile": opt.tile, "overlap": opt.overlap},
        "monai_cl": {**common, "tile": opt.tile, "overlap": opt.overlap, "channels_last": True},
        "model_gauss": {**common, "tile": opt.tile, "mode": "gaussian", "overlap": opt.overlap},
        "tilenet_gauss": {
            **common,
            "tile": opt.tile,
            "mode": "gaussian",
            "overlap": opt.overlap,
            "readers": opt.readers,
        },
        "toolbelt": {**common, "tile": opt.tile, "step": step, "classes": spec.num_classes},
        "whole": dict(common),
    }
    kinds = {
        "model_crop": "model",
        "model_gauss": "model",
        "tilenet_crop": "tilenet",
        "tilenet_gauss": "tilenet",
        "monai_cl": "monai",
    }
    wanted = [c for c in opt.contenders if c != "whole" or side <= opt.whole_max]
    saved: dict[str, Path] = {}
    res: dict[str, list[dict[str, Any]]] = {c: [] for c in wanted}
    loads = []
    for rep in range(opt.repeats):
        for c in wanted:
            a = dict(runs[c])
            last = rep == opt.repeats - 1
            if c.startswith("tilenet"):
                a["out"] = str(work / f"out_{side}_{c}")
                shutil.rmtree(a["out"], ignore_errors=True)
                if last:
                    saved[c] = Path(a["out"]) / "probabilities.ome.zarr"
            elif c in ("monai", "monai_cl", "toolbelt", "whole") and last and side <= opt.whole_max:
                a["save"] = str(work / f"probs_{side}_{c}.npy")
                saved[c] = Path(a["save"])
            r = _run(kinds.get(c, c), a)
            res[c].append(r)
            loads.append(os.getloadavg()[0])
            print(
                f"  {side}² {c:14s} round {rep + 1}: {r['wall_s']:7.2f} s, "
                f"peak RSS {r['peak_rss_mb']:7.1f} MB (load {loads[-1]:.1f})",
                flush=True,
            )
    mpx = side * side / 1e6
    table: dict[str, Any] = {}
    for c, rs in res.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        row: dict[str, Any] = {
            "wall_s": [round(r["wall_s"], 3) for r in rs],
            "wall_s_median": round(wall, 3),
            "mpx_per_s": round(mpx / wall, 3),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "cpu_timed_s": [round(r["cpu_timed_s"], 2) for r in rs],
        }
        if "tiles" in rs[-1]:
            row["tiles"] = rs[-1]["tiles"]
        if c.startswith("tilenet"):
            s = rs[-1]["summary"]
            row["halo"] = s["halo"]
            row["tile"] = s["tile"]
            row["tile_phase_s"] = [r["summary"]["timings"]["tiles_s"] for r in rs]
            row["tile_phase_cpu_s"] = [r["summary"]["timings"]["tiles_cpu_s"] for r in rs]
            row["timings_last"] = s["timings"]
        if c.startswith("model"):
            row["recompute"] = round(rs[-1]["model_px"] / (side * side), 3)
        table[c] = row
    if "whole" in saved:
        for c, p in saved.items():
            if c != "whole":
                table[c]["max_abs_diff_vs_whole"] = _max_abs_diff(p, saved["whole"])
    for p in saved.values():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for c in wanted:
        if c.startswith("tilenet"):
            shutil.rmtree(work / f"out_{side}_{c}", ignore_errors=True)
    ratios: dict[str, Any] = {}

    def ratio(num: str, den: str, key: str = "wall_s_median") -> float | None:
        if num in table and den in table:
            return round(table[num][key] / table[den][key], 3)
        return None

    ratios["efficiency_crop"] = ratio("model_crop", "tilenet_crop")
    ratios["efficiency_gauss"] = ratio("model_gauss", "tilenet_gauss")
    for mode in ("crop", "gauss"):
        m, t = f"model_{mode}", f"tilenet_{mode}"
        if m in table and t in table:
            phase = statistics.median(table[t]["tile_phase_s"])
            ratios[f"efficiency_{mode}_tile_phase"] = round(table[m]["wall_s_median"] / phase, 3)
            # CPU seconds are robust to other jobs on a shared machine (wall time is not).
            m_cpu = statistics.median(table[m]["cpu_timed_s"])
            t_cpu = statistics.median(table[t]["cpu_timed_s"])
            ratios[f"efficiency_{mode}_cpu"] = round(m_cpu / t_cpu, 3)
    ratios["gauss_vs_monai_throughput"] = ratio("monai", "tilenet_gauss")
    ratios["crop_vs_monai_throughput"] = ratio("monai", "tilenet_crop")
    ratios["gauss_vs_monai_cl_throughput"] = ratio("monai_cl", "tilenet_gauss")
    ratios["gauss_vs_monai_rss"] = ratio("tilenet_gauss", "monai", "peak_rss_mb")
    ratios["crop_vs_monai_rss"] = ratio("tilenet_crop", "monai", "peak_rss_mb")
    return {
        "side": side,
        "gauss_step": step,
        "contenders": table,
        "ratios": ratios,
        "loadavg_1min": [round(v, 2) for v in loads],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="2048,4096,8192", help="image sides (px)")
    ap.add_argument("--model", default="unet", help="registry model (default unet)")
    ap.add_argument("--model-kwargs", default='{"depth": 3, "base": 4}', help="JSON kwargs")
    ap.add_argument("--tile", type=int, default=512, help="gaussian tile = MONAI/toolbelt ROI")
    ap.add_argument("--crop-tile", type=int, default=1024, help="tilenet crop-mode tile")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--readers", type=int, default=2, help="tilenet reader threads")
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N] for every contender (GPU: unmeasured)"
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="bf16 = autocast for every contender (use with --device cuda)",
    )
    ap.add_argument("--repeats", default="1,2,1", help="rounds per size (one value or per size)")
    ap.add_argument("--whole-max", type=int, default=4096, help="largest side for 'whole'")
    ap.add_argument(
        "--contenders",
        default=",".join(DEFAULT),
        help=f"in run order, from: {', '.join(ALL)} (monai_cl: MONAI with a channels_last model)",
    )
    ap.add_argument("--workdir", default=None, help="images and outputs (default: a temp dir)")
    ap.add_argument("--out", default="bench_results/bench_peers.json")
    ap.add_argument("--quick", action="store_true", help="256² smoke run with the tiny model")
    opt = ap.parse_args(argv)
    if opt.child:
        bu.child_report(CHILDREN[opt.child[0]](json.loads(opt.child[1])))
        return 0
    if opt.quick:
        opt.sizes, opt.repeats, opt.tile, opt.crop_tile = "256", "1", 128, 128
        opt.model, opt.model_kwargs = "unet", '{"depth": 2, "base": 2}'
    opt.contenders = [c.strip() for c in opt.contenders.split(",") if c.strip()]
    bad = sorted(set(opt.contenders) - set(ALL))
    if bad:
        ap.error(f"unknown contender {bad[0]!r}; choose from {', '.join(ALL)}")
    sizes = [int(v) for v in opt.sizes.split(",")]
    reps = [int(v) for v in opt.repeats.split(",")]
    reps = reps * len(sizes) if len(reps) == 1 else reps
    if len(reps) != len(sizes):
        ap.error("--repeats needs one value or one per size")

    from tilenet.engine.checkpoint import load_model

    tmp = None if opt.workdir else tempfile.mkdtemp(prefix="bench_peers-")
    work = Path(opt.workdir or tmp)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    kwargs = json.loads(opt.model_kwargs)
    ckpt = bu.make_checkpoint(work / "peers.pt", opt.model, kwargs)
    spec = load_model(ckpt)[1]
    result: dict[str, Any] = {
        "machine": bu.machine_info(),
        "model": {
            "name": opt.model,
            "kwargs": kwargs,
            "stride": spec.stride,
            "receptive_field": spec.receptive_field,
        },
        "settings": {
            "tile": opt.tile,
            "crop_tile": opt.crop_tile,
            "overlap": opt.overlap,
            "batch": opt.batch,
            "readers": opt.readers,
            "device": opt.device,
            "dtype": opt.precision,
            "image": "RGB uint8, JPEG-tiled TIFF (512² tiles)",
        },
        "sizes": [],
    }
    try:
        for side, rep in zip(sizes, reps, strict=True):
            opt.repeats = rep
            print(f"{side}² ({rep} round(s)):", flush=True)
            result["sizes"].append(bench_size(side, ckpt, spec, work, opt))
            bu.write_json(opt.out, result)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    bu.write_json(opt.out, result)
    parts = []
    for s in result["sizes"]:
        r, t = s["ratios"], s["contenders"]
        bits = [f"{s['side']}²:"]
        for c in ("tilenet_crop", "tilenet_gauss", "monai", "monai_cl", "toolbelt", "whole"):
            if c in t:
                bits.append(f"{c} {t[c]['mpx_per_s']} Mpx/s {t[c]['peak_rss_mb']:.0f} MB")
        bits.append(
            f"eff crop/gauss {r.get('efficiency_crop')}/{r.get('efficiency_gauss')}, "
            f"×MONAI gauss {r.get('gauss_vs_monai_throughput')} crop "
            f"{r.get('crop_vs_monai_throughput')}, RSS/MONAI {r.get('gauss_vs_monai_rss')}"
        )
        parts.append(" ".join(bits))
    print("bench_peers: " + " | ".join(parts) + f" -> {opt.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
