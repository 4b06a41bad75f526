"""Encoders side by side: parameters, activation memory, training and inference speed, exactness.

Each model runs in a fresh subprocess (imports before the clock), one after the other:

* parameters, receptive field, stride and exactness from the registry model itself
  (:func:`tilenet.models.exactness`);
* activation memory from the traced graph (:func:`tilenet.models.model_memory`): training at
  the training patch and batch, inference at the model's inference tile and batch, fp32;
* training patches/s: AdamW steps (forward, cross-entropy, backward, step) on random
  ``batch`` x 3 x ``patch``² batches, after one warm-up step;
* inference Mpx/s: :func:`tilenet.infer_image` in crop mode on a ``size``² RGB JPEG-tiled
  TIFF (the class map only), ``tiles_s`` (the tile phase) and the whole call. The tile is
  ``--tile`` or, where the halo needs it, 4 halos (deep encoders have receptive fields of
  hundreds of pixels: crop mode recomputes that margin, part of their cost). Models that are
  not exact run in crop mode too (infer warns): the speed is comparable, the output is not
  seam-free.

    python scripts/bench_encoders.py                     # 256², batch 8; 2048² image
    python scripts/bench_encoders.py --quick             # tiny smoke run, two models
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

#: (label, registry name, kwargs): tilenet's own U-Net and smp U-Nets over small encoders.
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("unet", "unet", {}),
    ("smp.Unet resnet18", "smp.Unet", {"encoder_name": "resnet18"}),
    ("smp.Unet tu-convnext_atto", "smp.Unet", {"encoder_name": "tu-convnext_atto"}),
    ("smp.Unet tu-regnetx_002", "smp.Unet", {"encoder_name": "tu-regnetx_002"}),
    ("smp.Unet mobilenet_v2", "smp.Unet", {"encoder_name": "mobilenet_v2"}),
]


def child(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    import tilenet.engine.infer
    import tilenet.io  # noqa: F401  (imported before the clock)
    from tilenet.engine.infer import infer_image
    from tilenet.geometry import ceil_to
    from tilenet.models import create_model, exactness, model_memory

    torch.manual_seed(0)
    model = create_model(a["name"], in_channels=3, num_classes=3, **a["kwargs"])
    exact, reason = exactness(model)
    out: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "stride": model.stride,
        "receptive_field": model.receptive_field,
        "exact": exact,
        "exact_reason": reason,
    }
    b, p = a["batch"], a["patch"]
    train_mem = model_memory(model, tile=p, batch=b, training=True)
    out["train_activation_mb"] = round(train_mem["activation_bytes"] / 1e6, 1)

    net = model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(b, 3, p, p).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (b, p, p))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        step()
    dt = time.perf_counter() - t0
    out["train_patches_per_s"] = round(a["steps"] * b / dt, 3)
    out["train_step_s"] = round(dt / a["steps"], 3)

    ckpt = bu.make_checkpoint(Path(a["work"]) / "m.pt", a["name"], a["kwargs"])
    # At least the tile plan_grid suggests for this halo (a core of >= 2 halos per side).
    halo = ceil_to(model.receptive_field, model.stride)
    tile = max(a["tile"], ceil_to(4 * halo, model.stride))
    out["infer_tile"] = tile
    opts = {"tile": tile, "batch": a["infer_batch"], "mode": "crop", "device": "cpu"}
    t0 = time.perf_counter()
    s = infer_image(a["image"], ckpt, a["out"], outputs=["classes"], **opts)
    wall = time.perf_counter() - t0
    mpx = a["size"] ** 2 / 1e6
    infer_mem = model_memory(model, tile=tile, batch=a["infer_batch"])
    out["infer_activation_mb"] = round(infer_mem["activation_bytes"] / 1e6, 1)
    out["infer_tiles"] = s["tiles"]
    out["infer_halo"] = s["halo"]
    out["infer_mpx_per_s"] = round(mpx / s["timings"]["tiles_s"], 3)
    out["infer_total_mpx_per_s"] = round(mpx / wall, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    labels = [m[0] for m in MODELS]
    ap.add_argument("--models", default=",".join(labels), help="comma-separated labels")
    ap.add_argument("--patch", type=int, default=256, help="training patch side (px)")
    ap.add_argument("--batch", type=int, default=8, help="training batch")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--size", type=int, default=2048, help="inference image side (px)")
    ap.add_argument("--tile", type=int, default=512, help="inference tile (px)")
    ap.add_argument("--infer-batch", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="image and outputs (default: a temp dir)")
    ap.add_argument("--out", default="bench_results/bench_encoders.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 models, tiny sizes")
    opt = ap.parse_args(argv)
    if opt.child:
        bu.child_report(child(json.loads(opt.child)))
        return 0
    if opt.quick:
        opt.models = "unet,smp.Unet resnet18"
        opt.patch, opt.batch, opt.steps, opt.size, opt.tile = 64, 2, 1, 1024, 512
    chosen = [m.strip() for m in opt.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(labels))
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; choose from: {', '.join(labels)}")
    tmp = None if opt.workdir else tempfile.mkdtemp(prefix="bench_encoders-")
    work = Path(opt.workdir or tmp)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        "patch": opt.patch,
        "batch": opt.batch,
        "steps": opt.steps,
        "size": opt.size,
        "tile": opt.tile,
        "infer_batch": opt.infer_batch,
        "precision": "fp32",
        "device": "cpu",
    }
    result: dict[str, Any] = {"machine": bu.machine_info(), "settings": settings, "models": []}
    try:
        img = bu.make_tiff(work / f"enc_{opt.size}.tif", opt.size)
        for label, name, kwargs in MODELS:
            if label not in chosen:
                continue
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            args = {
                **settings,
                "name": name,
                "kwargs": kwargs,
                "image": str(img),
                "out": str(out),
                "work": str(work),
            }
            r = bu.run_child([__file__, "--child", json.dumps(args)])
            row = {"label": label, "name": name, "kwargs": kwargs, **r}
            row["loadavg_1min"] = round(os.getloadavg()[0], 2)
            result["models"].append(row)
            print(
                f"{label}: {r['parameters'] / 1e6:.2f} M params, train "
                f"{r['train_patches_per_s']} patches/s, infer {r['infer_mpx_per_s']} Mpx/s, "
                f"exact {r['exact']} (load {row['loadavg_1min']})",
                flush=True,
            )
            bu.write_json(opt.out, result)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    bu.write_json(opt.out, result)
    best = max(result["models"], key=lambda m: m["infer_mpx_per_s"])
    print(
        f"bench_encoders: {len(result['models'])} models, train {opt.patch}² x {opt.batch}, "
        f"infer {opt.size}² tile {opt.tile}; fastest inference {best['label']} "
        f"{best['infer_mpx_per_s']} Mpx/s -> {opt.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
