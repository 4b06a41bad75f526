"""Side by side: patch embeddings of one slide by ``tilenet embed`` and by the loop other
tools run, with the same model and batch, plus the model's raw forward throughput.

A synthetic JPEG-tiled Aperio SVS (``--side``², 0.499 µm/px; written from a pool of
pre-encoded tiles, as ``bench_slides.py`` does) is cut into 224² patches at its own pixel
size. Per encoder (``mobilenetv3_small_100``: small, where reading and decoding dominate, as
on a GPU; ``vit_base_patch16_224``: large, where the model dominates), random weights, each
contender runs in this process, interleaved per round, best of ``--rounds``:

* ``tilenet``: :func:`tilenet.engine.embed.embed_image` (reader threads ahead of the model,
  stored JPEG tiles decoded per batch by libjpeg-turbo, resize/crop/normalise on the device,
  features streamed to an ``.h5``);
* ``loop``: what CLAM/TRIDENT-style extractors do: per patch
  ``openslide.read_region(...).convert("RGB")``, PIL resize (the model's eval transform:
  bicubic to 256, centre crop 224), to a tensor, normalise, stack ``--batch``, the model,
  all features concatenated then written to an ``.h5`` once;
* ``forward``: the model alone, as timm builds it, on the loop's own normalised batches
  (the raw forward pass; random weights make activation magnitudes, and so the cost of
  denormal arithmetic, depend on the input, so it gets the same inputs);
* ``forward_prepared``: the same, with the model as ``embed_image`` prepares it (eval,
  BatchNorm folded into the convolutions, channels_last): tilenet's own ceiling.

The loop and ``forward`` run a copy of the encoder made before tilenet prepares its own.

Reported: patches/s of each (wall, and per CPU second of all threads: the steadier figure
on a shared machine), ``speedup`` = tilenet / loop, ``of_forward`` = tilenet / forward,
``model_busy`` (the share of tilenet's own wall time spent in the model, measured inside
the run, so immune to the load changing between contenders), and the largest feature
difference between tilenet and the loop relative to the largest feature (the resize
differs: PIL's bicubic on uint8 vs torch's antialiased bicubic on floats).

    python scripts/bench_embed.py --out docs/bench_embed.json       # ~10 min on 2 shared cores
    python scripts/bench_embed.py --quick                            # 1024², small models
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
import _benchutil as bu
from bench_slides import _tile_pool, write_svs

PATCH = 224


def _loop(
    slide: Path, coords: np.ndarray, model: Any, spec: Any, batch: int, out: Path
) -> tuple[float, list[Any]]:
    """The per-patch OpenSlide loop; returns seconds and the model's input batches."""
    import h5py
    import openslide
    import torch
    from PIL import Image

    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    size, resize = spec.input_size, spec.resize or spec.input_size
    t0 = time.perf_counter()
    feats, inputs = [], []
    with openslide.OpenSlide(str(slide)) as s, torch.inference_mode():
        for i in range(0, len(coords), batch):
            xs = []
            for x, y in coords[i : i + batch]:
                im = s.read_region((int(x), int(y)), 0, (PATCH, PATCH)).convert("RGB")
                im = im.resize((resize, resize), Image.BICUBIC)
                left = (resize - size) // 2
                im = im.crop((left, left, left + size, left + size))
                t = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)
                xs.append((t - mean) / std)
            inputs.append(torch.stack(xs))
            feats.append(model(inputs[-1]).numpy())
    with h5py.File(out, "w") as f:
        f["features"] = np.concatenate(feats)
        f["coords"] = coords
    return time.perf_counter() - t0, inputs


def _forward(model: Any, inputs: list[Any]) -> float:
    """The model alone on the loop's own normalised batches (random weights make activation
    magnitudes, and so denormal arithmetic, depend on the input: same inputs, same work)."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in inputs:
            model(x)
    return time.perf_counter() - t0


def _bench_encoder(
    name: str, slide: Path, tmp: Path, *, batch: int, readers: int, rounds: int
) -> dict[str, Any]:
    import copy

    import h5py
    import torch

    from tilenet.engine.embed import EmbedConfig, embed_image
    from tilenet.engine.weights import load_encoder

    loaded = load_encoder(f"timm:{name}", "random")
    spec = loaded.encoder.spec
    # The loop and `forward` run the model as timm builds it (what other tools run);
    # embed_image prepares `loaded`'s own (eval, BatchNorm folded, channels_last) in place.
    eager = copy.deepcopy(loaded.encoder).eval()
    cfg = EmbedConfig(patch=PATCH, batch=batch, readers=readers)
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    n, busy = 0, 0.0
    for r in range(rounds):
        c0 = time.process_time()
        res = embed_image(slide, loaded, tmp / f"{name}-{r}", config=cfg)
        c1 = time.process_time()
        with h5py.File(res.path, "r") as f:
            coords, ours = f["coords"][:], f["features"][:]
        n = len(coords)
        loop_h5 = tmp / f"loop-{name}-{r}.h5"
        c2 = time.process_time()
        t_loop, inputs = _loop(slide, coords, eager, spec, batch, loop_h5)
        c3 = time.process_time()
        t_fwd = _forward(eager, inputs)
        c4 = time.process_time()
        cl = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        del inputs
        c5 = time.process_time()
        t_prep = _forward(loaded.encoder, cl)  # as embed_image prepared it
        c6 = time.process_time()
        del cl
        busy = max(busy, res.model_s / res.seconds)
        for k, t, c in (
            ("tilenet", res.seconds, c1 - c0),
            ("loop", t_loop, c3 - c2),
            ("forward", t_fwd, c4 - c3),
            ("forward_prepared", t_prep, c6 - c5),
        ):
            best[k] = min(best.get(k, float("inf")), t)
            cpu[k] = min(cpu.get(k, float("inf")), c)
        with h5py.File(loop_h5, "r") as f:
            theirs = f["features"][:]
        diff = float(np.abs(theirs - ours).max() / (np.abs(theirs).max() + 1e-12))
    rate = {k: round(n / t, 2) for k, t in best.items()}
    cpu_rate = {k: round(n / c, 2) for k, c in cpu.items()}
    return {
        "encoder": name,
        "dim": spec.dim,
        "patches": n,
        "patches_per_s": rate,
        "speedup": round(rate["tilenet"] / rate["loop"], 2),
        "of_forward": round(rate["tilenet"] / rate["forward"], 3),
        # the model as tilenet runs it (BatchNorm folded, channels_last) alone: its ceiling
        "of_forward_prepared": round(rate["tilenet"] / rate["forward_prepared"], 3),
        # patches per CPU second (all threads): the steadier figure on a shared machine
        "patches_per_cpu_s": cpu_rate,
        "speedup_cpu": round(cpu_rate["tilenet"] / cpu_rate["loop"], 2),
        "of_forward_cpu": round(cpu_rate["tilenet"] / cpu_rate["forward"], 3),
        # largest |tilenet - loop| over the largest |loop| feature (resize implementations)
        "max_rel_feature_diff_vs_loop": round(diff, 4),
        # fraction of tilenet's wall time spent in transfer + transform + forward
        "model_busy": round(busy, 3),
        "transform": {"resize": spec.resize, "crop": spec.input_size, "interp": spec.interpolation},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=3072, help="slide side for the small encoder")
    ap.add_argument("--side-large", type=int, default=1536, help="slide side, large encoder")
    ap.add_argument("--small", default="mobilenetv3_small_100")
    ap.add_argument("--large", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1024² slides, vit_tiny, 1 round")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    if args.quick:
        args.side, args.side_large, args.rounds = 1024, 672, 1
        args.large, args.batch = "vit_tiny_patch16_224", 16
    import torch

    pool = _tile_pool()
    results: dict[str, Any] = {"machine": bu.machine_info(), "threads": torch.get_num_threads()}
    results["args"] = vars(args)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs = []
        for name, side in ((args.small, args.side), (args.large, args.side_large)):
            slide = write_svs(tmp / f"slide{side}.svs", side, pool)
            r = _bench_encoder(
                name, slide, tmp, batch=args.batch, readers=args.readers, rounds=args.rounds
            )
            r["side"] = side
            runs.append(r)
    results["runs"] = runs
    results["loadavg_end"] = bu.machine_info().get("loadavg_start")
    if args.out:
        bu.write_json(args.out, results)
    print(
        "bench_embed: "
        + "; ".join(
            f"{r['encoder']}: tilenet {r['patches_per_s']['tilenet']} patches/s, loop "
            f"{r['patches_per_s']['loop']} ({r['speedup']}x), forward "
            f"{r['patches_per_s']['forward']} ({r['of_forward']:.0%} of it); per CPU-s "
            f"{r['speedup_cpu']}x the loop, {r['of_forward_cpu']:.0%} of forward"
            for r in runs
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
