"""Benchmark: patches/s the streaming loader delivers, against the model's training rate.

Builds a patch store (256 x 256, 3-channel uint8, cut by ``tilenet tile`` from smooth
synthetic RGB images so compression is realistic), then measures the batches a training loop
receives from ``PatchStoreDataset`` through a DataLoader with 0 and 2 workers, with and
without augmentation. It also times training steps of the default model (``unet``, 3 -> 3
classes, AdamW, cross-entropy) on the same machine and reports each loader rate as a multiple
of the training rate (both in patches/s). Two outputs are measured: ``float`` (normalised
float32 batches + int64 masks, made in the workers) and ``uint8`` (raw batches for
normalising on the GPU with ``tilenet.patches.data.normalize_batch``). Writes JSON.

    python scripts/bench_loader.py --out bench_loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(root: Path, *, images: int, size: int, patch: int) -> Path:
    import tifffile
    from scipy import ndimage

    from tilenet.patches.tiler import tile_images

    rng = np.random.default_rng(0)
    (root / "im").mkdir(parents=True, exist_ok=True)
    (root / "lab").mkdir(exist_ok=True)
    for i in range(images):
        small = rng.random((size // 16, size // 16, 3)).astype(np.float32)
        img = ndimage.zoom(small, (16, 16, 1), order=1) * 200
        img += rng.normal(0, 8, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        lab = (img[..., 0] // 86).astype(np.uint8)
        kw = {"tile": (256, 256), "compression": "zlib"}
        tifffile.imwrite(root / "im" / f"b{i}.tif", img, photometric="rgb", **kw)
        tifffile.imwrite(root / "lab" / f"b{i}.tif", lab, **kw)
    return tile_images(
        [root / "im"],
        labels=root / "lab",
        out=root / "bench.zarr",
        patch=patch,
        overlap=0,
        workers=2,
        progress=False,
    )


def loader_rate(
    store: Path, *, workers: int, augment: bool, output: str, batch: int, min_seconds: float
) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from tilenet.config import AugmentConfig
    from tilenet.patches.data import PatchStoreDataset

    ds = PatchStoreDataset(
        store,
        batch_size=batch,
        shuffle=True,
        buffer=512,
        augment=AugmentConfig() if augment else None,
        output=output,  # type: ignore[arg-type]
    )
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
    )
    n = 0
    epoch = 0
    t0 = None
    c0 = 0.0
    while True:
        ds.set_epoch(epoch)
        for x, _m in loader:
            assert x.dtype == (torch.float32 if output == "float" else torch.uint8)
            if t0 is None:  # start the clock at the first batch (worker start-up excluded)
                t0, c0 = time.perf_counter(), _cpu_seconds()
                continue
            n += len(x)
        epoch += 1
        if t0 is not None and time.perf_counter() - t0 >= min_seconds:
            break
    dt = time.perf_counter() - (t0 or 0)
    cpu = _cpu_seconds() - c0
    out = {
        "patches": n,
        "seconds": round(dt, 3),
        "patches_per_s": round(n / dt, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    # Wall-clock rates suffer when other jobs share the cores; CPU time (this process and
    # its DataLoader workers) does not: 2 x patches_per_cpu_s bounds a dedicated 2-core rate.
    out["patches_per_cpu_s"] = round(n / max(cpu, 1e-9), 1)
    del loader  # stop persistent workers before the next case
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def train_rate(*, batch: int, patch: int, steps: int) -> dict[str, float]:
    import torch

    from tilenet.models import create_model

    model = create_model("unet", in_channels=3, num_classes=3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, patch, patch)
    y = torch.randint(0, 3, (batch, patch, patch))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        loss_fn(out, y).backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {
        "batch": batch,
        "seconds_per_step": round(dt, 3),
        "steps_per_s": round(1 / dt, 3),
        "patches_per_s": round(batch / dt, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_loader.json", help="JSON output path")
    ap.add_argument("--batch", type=int, default=16, help="batch size (DataConfig default 16)")
    ap.add_argument("--images", type=int, default=4, help="synthetic source images")
    ap.add_argument("--size", type=int, default=2048, help="side of each source image")
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum seconds per case")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--store", default=None, help="reuse this patch store instead")
    args = ap.parse_args()

    import torch

    # The loader's own work is single-threaded per process (DataLoader workers run with one
    # torch thread); with two intra-op threads per process, busy-waiting pools fight over two
    # cores and every case gets several times slower. Training gets all cores below.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = (
            Path(args.store)
            if args.store
            else make_store(Path(tmp), images=args.images, size=args.size, patch=256)
        )
        import zarr

        n = zarr.open_group(store, mode="r").attrs["count"]
        cases = []
        for augment in (False, True):
            for output in ("float", "uint8"):
                for workers in (0, 2):
                    r = loader_rate(
                        store,
                        workers=workers,
                        augment=augment,
                        output=output,
                        batch=args.batch,
                        min_seconds=args.seconds,
                    )
                    r.update(workers=workers, augment=augment, output=output)
                    per_cpu = r.get("patches_per_cpu_s")
                    print(
                        f"workers={workers} augment={augment!s:5} output={output:5}: "
                        f"{r['patches_per_s']:8.1f} patches/s"
                        + f"  ({per_cpu:.0f} per CPU-second)"
                        + f"  load {r['load_avg_1min']}",
                        flush=True,
                    )
                    cases.append(r)
        torch.set_num_threads(os.cpu_count() or 1)
        tr = train_rate(batch=args.batch, patch=256, steps=args.train_steps)
        print(f"training (unet, batch {args.batch}, CPU): {tr['patches_per_s']} patches/s")
        for c in cases:
            c["ratio_to_training"] = round(c["patches_per_s"] / tr["patches_per_s"], 1)
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
            },
            "store_patches": n,
            "patch": 256,
            "channels": 3,
            "batch": args.batch,
            "loader": cases,
            "training": tr,
        }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
