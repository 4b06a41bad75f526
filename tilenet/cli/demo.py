"""``tilenet demo``: the whole pipeline on a synthetic dataset, end to end, in minutes on a CPU.

Steps: make the synthetic dataset (``tilenet synth``: training images and one held-out image)
and tile it into patch stores; train with ``conf/demo.yaml``; run tiled inference
(``tilenet infer``) on the held-out image; score its class map against the held-out labels.
Everything goes under one directory; ``DIR/demo.json`` records the Dice, the time taken and
the output paths.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from tilenet.errors import EXIT_OK, ConfigError
from tilenet.fsutil import write_text_atomic

__all__ = ["add_demo", "demo_config_path", "run_demo"]


def demo_config_path() -> Path:
    """``conf/demo.yaml``, shipped inside the package (``tilenet/conf``; the repository's
    ``conf/`` is a link to it), so a wheel install finds it as a source checkout does."""
    path = Path(__file__).resolve().parent.parent / "conf" / "demo.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: demo config not found (a broken install?)")
    return path


def _scores(classes: Any, labels_path: Path, names: list[str]) -> dict[str, Any]:
    """Dice/IoU of a class map (zarr) against a label image, chunk by chunk."""
    from tilenet.io import open_image
    from tilenet.train.metrics import score_class_map, scores_from_confusion

    with open_image(labels_path) as lab:
        counts = score_class_map(classes, lab, len(names))
    scores = scores_from_confusion(counts.confusion, class_names=names)
    scores["dice_foreground_binary"] = counts.foreground_dice
    return scores


def run_demo(
    out_dir: str | os.PathLike[str] = "tilenet-demo", *, progress: bool = False
) -> dict[str, Any]:
    """Run the demo into ``out_dir``; return (and write to ``out_dir/demo.json``) the result.

    ``dice`` is the mean Dice over the foreground classes of the held-out image (the
    training's ``val_dice``, computed on the whole stitched image); per-class scores and the
    binary foreground Dice are included.
    """
    import zarr

    from tilenet.config import load_config
    from tilenet.engine.infer import infer_image
    from tilenet.train import prepare_demo_data, train

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    conf = demo_config_path()
    cfg = load_config(
        conf,
        [
            f"data.synth_dir={out / 'data'}",
            f"train.out_dir={out / 'run'}",
            f"train.progress={str(progress).lower()}",
        ],
    )
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        print(f"demo: {name} done in {timings[name]:.1f} s", flush=True)
        return now

    t = time.perf_counter()
    prepared = prepare_demo_data(cfg.data)  # synth + tile (train() then finds them done)
    t = lap("synth+tile", t)
    run_dir = train(cfg)
    t = lap("train", t)
    ckpt = run_dir / "best.pt"
    if not ckpt.is_file():
        ckpt = run_dir / "last.pt"
    image, labels = Path(prepared["val_images"][0]), Path(prepared["val_labels"][0])
    infer_opts = {k: v for k, v in cfg.infer.items() if k in ("tile", "batch", "mode")}
    summary = infer_image(image, ckpt, out / "infer", progress=progress, **infer_opts)
    t = lap("infer", t)
    names = list(summary["class_names"])
    classes = zarr.open_group(summary["outputs"]["classes"], mode="r")["0"]
    scores = _scores(classes, labels, names)
    lap("score", t)
    result: dict[str, Any] = {
        "dice": scores["mean_dice"],
        "dice_foreground_binary": scores["dice_foreground_binary"],
        "per_class_dice": scores.get("dice"),
        "seconds": round(time.perf_counter() - t0, 1),
        "timings": timings,
        "config": str(conf),
        "checkpoint": str(ckpt),
        "held_out_image": str(image),
        "held_out_labels": str(labels),
        "outputs": {**summary["outputs"], "run_dir": str(run_dir)},
    }
    write_text_atomic(out / "demo.json", json.dumps(result, indent=2) + "\n")
    result["outputs"]["demo_json"] = str(out / "demo.json")
    return result


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on synthetic data: synth, tile, train, infer, score (minutes)",
        description=(
            "Make a small synthetic dataset (tilenet synth), tile it, train with "
            "conf/demo.yaml, run tilenet infer on a held-out synthetic image and print its "
            "foreground Dice against the labels and the output paths. DIR/demo.json holds "
            "dice, seconds and the outputs. About 5 minutes on 2 CPU cores."
        ),
    )
    p.add_argument(
        "--out",
        default="tilenet-demo",
        metavar="DIR",
        help="directory for everything (default ./tilenet-demo)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.out, progress=not args.quiet)
    print(f"foreground Dice (mean over classes): {result['dice']:.4f}")
    print(f"foreground Dice (binary):            {result['dice_foreground_binary']:.4f}")
    print(f"seconds: {result['seconds']}")
    for name, path in result["outputs"].items():
        print(f"{name}: {path}")
    return EXIT_OK
