"""Benchmark the model backends of tiled inference: eager torch, ``torch.compile``, ONNX.

The demo U-Net (depth 3, base 16: ``conf/demo.yaml``) over one RGB TIFF, crop mode, on the
CPU, through :func:`tilenet.infer_image` with one :class:`~tilenet.engine.predictor.Predictor`
per backend, run twice: the first run of ``compile`` includes compiling (at its first batch,
and again for the edge batches of another shape), the second is the steady state. Each
backend's probabilities are compared with eager's (max |diff|). ``--onnx`` adds the model
exported by ``tilenet export`` and run through onnxruntime (the export's seconds reported).

    python scripts/bench_compile.py --size 2048 --tile 512 --out docs/bench_compile.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import machine_info, make_checkpoint, make_tiff, write_json


def _probs(out: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(out / "probabilities.ome.zarr", mode="r")["0"][:])


def _run(model: Any, img: Path, work: Path, tag: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Two runs of one predictor; their wall seconds and the model's share."""
    from tilenet.config import InferConfig
    from tilenet.engine.infer import infer_image
    from tilenet.engine.predictor import Predictor

    t0 = time.perf_counter()
    predictor = Predictor(model, InferConfig(**opts))
    load_s = time.perf_counter() - t0
    runs = []
    for i in (1, 2):
        t0 = time.perf_counter()
        summary = infer_image(img, predictor, work / f"{tag}{i}", **opts)
        runs.append(
            {
                "wall_s": round(time.perf_counter() - t0, 2),
                "tiles_s": summary["timings"]["tiles_s"],
                "model_s": summary["timings"]["model_s"],
            }
        )
    return {
        "load_s": round(load_s, 2),
        "first": runs[0],
        "steady": runs[1],
        "tiles": summary["tiles"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="image side (px)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--onnx", action="store_true", help="also the exported ONNX model")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    import torch

    opts = {
        "device": "cpu",
        "tile": args.tile,
        "batch": args.batch,
        "outputs": ["probabilities"],
        "probabilities_dtype": "float32",
    }
    result: dict[str, Any] = {"machine": machine_info(), "size": args.size, **opts}
    result["threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        img = make_tiff(work / "img.tif", args.size, compression="zlib")
        ckpt = make_checkpoint(work / "unet.pt", "unet", {"depth": 3, "base": 16})
        models: dict[str, tuple[Any, dict[str, Any]]] = {
            "eager": (ckpt, {}),
            "compile": (ckpt, {"compile": True}),
        }
        if args.onnx:
            from tilenet.engine.export import export_model

            t0 = time.perf_counter()
            export_model(ckpt, work / "unet.onnx")
            result["onnx_export_s"] = round(time.perf_counter() - t0, 2)
            models["onnx"] = (work / "unet.onnx", {})
        reference = None
        for tag, (model, extra) in models.items():
            r = _run(model, img, work, tag, {**opts, **extra})
            probs = _probs(work / f"{tag}2")
            if reference is None:
                reference = probs
            r["max_abs_diff_vs_eager"] = float(np.abs(probs - reference).max())
            result[tag] = r
            print(tag, r, flush=True)
    eager = result["eager"]["steady"]["tiles_s"]
    for tag in models:
        if tag != "eager":
            r = result[tag]
            r["steady_speedup"] = round(eager / r["steady"]["tiles_s"], 2)
            r["first_run_vs_eager"] = round(
                r["first"]["wall_s"] / result["eager"]["first"]["wall_s"], 2
            )
    line = ", ".join(
        f"{t}: steady {result[t]['steady']['tiles_s']:.1f} s, first {result[t]['first']['wall_s']:.1f} s"
        for t in models
    )
    print(f"{args.size}² unet(depth 3, base 16) tile {args.tile}: {line}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
