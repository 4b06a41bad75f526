"""The GPU benchmark: one run, one GPU, everything side by side; JSON out, one line printed.

For each model (default: ``tiny`` and a small U-Net) on a synthetic JPEG slide (YCbCr 4:2:0,
512² tiles, like most scanners' SVS):

* ``e2e``: ``tilenet infer`` (:func:`tilenet.infer_image`, in this process) with
  ``--decode gpu`` (stored tiles decoded by nvJPEG on the device) and ``--decode cpu``
  (tifffile/imagecodecs in ``--readers`` threads): Mpx/s of the tile phase and of the whole
  run, GPU busy fraction (CUDA events around each batch's model; NVML utilisation too when
  ``pynvml`` is importable), peak device memory;
* ``forward``: the same prepared model on random device tensors of exactly the engine's
  batches (:func:`tilenet.engine.tiles.batch_shapes`): the ceiling;
* ``monai``: MONAI's ``sliding_window_inference`` over the same slide (read whole, windows
  on the GPU, output on the host), when ``monai`` is importable;
* ``train``: bf16 (autocast) training steps/s of the model (AdamW, cross-entropy).

Once per run: ``decode`` (the slide's stored tiles decoded alone: the device decoder in
batches, and one CPU thread of libjpeg-turbo), and ``codecs`` (one CPU thread decoding a
512² tile in each codec tilenet reads: the JPEG 2000/deflate/LZW/zstd paths stay on the CPU).

Usage (a GPU machine, no network needed; ~2-4 minutes)::

    python scripts/bench_gpu.py --out bench_gpu.json
    python scripts/bench_gpu.py --dry-run     # CPU, tiny sizes: the CI smoke run (< 10 s)

``--dry-run`` runs every part on the CPU (``--decode gpu`` as the device decoder forced onto
the CPU, which is the same batched call on libjpeg-turbo). Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu

#: (model name, constructor keyword arguments) run by default.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {}),
    "unet16": ("unet", {"base": 16, "depth": 4}),
}
FULL = {"side": 16384, "tile": 1024, "batch": 8, "train_tile": 512, "train_batch": 16,
        "steps": 30, "decode_batch": 64, "codec_tile": 512, "repeats": 20}  # fmt: skip
DRY = {"side": 256, "tile": 128, "batch": 2, "train_tile": 64, "train_batch": 2,
       "steps": 2, "decode_batch": 4, "codec_tile": 64, "repeats": 2}  # fmt: skip


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- GPU busy: NVML when there, else the engine's CUDA events alone ---------------------------
class _Nvml:
    """Samples NVML GPU utilisation every 50 ms while the block runs (None without pynvml)."""

    def __init__(self, enabled: bool) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle: Any = None
        if enabled:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self._nvml = pynvml
            except Exception:
                self._handle = None

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            rate = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append(int(rate.gpu))

    def __enter__(self) -> _Nvml:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._stop.set()
            self._thread.join()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


# -- parts ----------------------------------------------------------------------------------------
def codec_rates(side: int, repeats: int) -> dict[str, float]:
    """Mpx/s of one CPU thread decoding a ``side``² RGB tile in each codec (best of repeats)."""
    import imagecodecs

    from tilenet.engine.decode import decode_jpegs

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    smooth = np.stack([140 + 90 * np.sin(yy / 37) * np.cos(xx / 23),
                       120 + 80 * np.cos((xx + yy) / 51), 150 + 60 * np.sin(xx / 17)], -1)  # fmt: skip
    tile = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    raw = tile.tobytes()
    jpeg = imagecodecs.jpeg8_encode(tile, level=90)
    j2k = imagecodecs.jpeg2k_encode(tile, level=80)
    zlib, lzw, zstd = (imagecodecs.zlib_encode(raw), imagecodecs.lzw_encode(raw),
                       imagecodecs.zstd_encode(raw))  # fmt: skip
    cases = {
        "jpeg_imagecodecs": (lambda: imagecodecs.jpeg8_decode(jpeg)),
        "jpeg_torchvision": (lambda: decode_jpegs([jpeg])),
        "jpeg2000": (lambda: imagecodecs.jpeg2k_decode(j2k)),
        "deflate": (lambda: imagecodecs.zlib_decode(zlib)),
        "lzw": (lambda: imagecodecs.lzw_decode(lzw)),
        "zstd": (lambda: imagecodecs.zstd_decode(zstd)),
    }
    out = {}
    for name, fn in cases.items():
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = round(side * side / best / 1e6, 3)
    return out


@contextlib.contextmanager
def _part(res: dict[str, Any], name: str, out: str) -> Iterator[None]:
    """Record the part's wall and CPU seconds in ``res["part_s"]``, then write ``res`` to
    ``out`` (a run stopped by a time limit keeps the parts it finished)."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    res.setdefault("part_s", {})[name] = [
        round(time.perf_counter() - t0, 2),
        round(time.process_time() - c0, 2),
    ]
    bu.write_json(out, res)


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_alone(slide: Path, device: Any, batch: int) -> dict[str, Any]:
    """Mpx/s decoding every stored tile of the slide: the device decoder, batched, and the
    CPU decoder (one thread of libjpeg-turbo)."""
    from tilenet.engine.decode import CpuDecoder, DeviceJpegDecoder
    from tilenet.geometry import Window
    from tilenet.io import open_image

    with open_image(slide) as img:
        (h, w), (th, tw) = img.levels[0].shape, img.levels[0].chunks
        wins = [Window(y, x, th, tw) for y in range(0, h, th) for x in range(0, w, tw)]
        ews = [img.encoded(win) for win in wins]
    batches = [ews[i : i + batch] for i in range(0, len(ews), batch)]
    px = len(ews) * th * tw
    out: dict[str, Any] = {"tiles": len(ews), "tile": [th, tw]}
    cpu_batches = batches[: max(1, len(batches) // 8)]  # one thread: a sample is enough
    for name, dec, dev, todo in [
        ("device", DeviceJpegDecoder(), device, batches),
        ("cpu_1thread", CpuDecoder(), "cpu", cpu_batches),
    ]:
        import torch

        dev = torch.device(dev)
        dec.decode(todo[0], dev)  # warm-up (nvJPEG handles, allocator)
        _sync(dev)
        t0 = time.perf_counter()
        for b in todo:
            dec.decode(b, dev)
        _sync(dev)
        dt = time.perf_counter() - t0
        n = sum(len(b) for b in todo) * th * tw
        out[f"{name}_mpx_s"] = round(n / dt / 1e6, 3)
        out[f"{name}_paths"] = dict(dec.tiles)
    out["mpx"] = round(px / 1e6, 3)
    return out


def e2e(
    slide: Path, ckpt: Path, decode: str, size: dict[str, Any], a: Any, dev: Any
) -> dict[str, Any]:
    """One ``tilenet infer`` run (after a warm-up on the same slide's first rows)."""
    import torch

    from tilenet.config import InferConfig
    from tilenet.engine.infer import infer_image
    from tilenet.engine.predictor import Predictor

    forced = "cuda-jpeg" if decode == "gpu" and dev.type != "cuda" else None
    cfg = InferConfig(device=str(dev), tile=size["tile"], batch=size["batch"],
                      decode="cpu" if forced else decode, readers=a.readers,
                      outputs=["classes"], precision=a.precision)  # fmt: skip
    predictor = Predictor(ckpt, cfg, decoder=forced)
    out = Path(tempfile.mkdtemp(prefix=f"out_{ckpt.stem}_{decode}_", dir=a.work))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with _Nvml(dev.type == "cuda") as nvml:
        summary = infer_image(slide, predictor, out, **dataclasses.asdict(cfg))
    timings = summary["timings"]
    px = summary["shape"][0] * summary["shape"][1]
    return {
        "mpx_s": round(px / timings["tiles_s"] / 1e6, 3),
        "mpx_s_total": round(px / timings["total_s"] / 1e6, 3),
        "tiles_s": timings["tiles_s"],
        "total_s": timings["total_s"],
        "read_wait_s": timings["read_wait_s"],
        "busy_events": round(timings.get("device_s", 0.0) / max(timings["tiles_s"], 1e-9), 3),
        "busy_nvml_pct": nvml.mean(),
        "peak_device_gib": (
            round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
        ),
        "decode": summary["decode"],
        "precision": summary["precision"],
        "tile": summary["tile"],
    }


def forward(
    ckpt: Path, shape: tuple[int, int], size: dict[str, Any], a: Any, dev: Any
) -> dict[str, Any]:
    """The prepared model alone on random device tensors of the engine's batches."""
    import torch

    from tilenet.config import InferConfig
    from tilenet.engine.predictor import Predictor
    from tilenet.engine.tiles import batch_shapes
    from tilenet.runtime import autocast

    cfg = InferConfig(
        device=str(dev), tile=size["tile"], batch=size["batch"], precision=a.precision
    )
    p = Predictor(ckpt, cfg)
    grid, _ = p.plan(shape)
    shapes = batch_shapes(grid, cfg)
    xs = {s: torch.randn(s[0], 3, *s[1], device=dev).to(memory_format=torch.channels_last)
          for s in set(shapes)}  # fmt: skip
    with torch.inference_mode(), autocast(dev, p.precision):
        for s in xs:  # warm-up: cudnn picks its algorithms per shape
            p.module(xs[s])
        _sync(dev)
        t0 = time.perf_counter()
        for s in shapes:
            p.module(xs[s])
        _sync(dev)
        dt = time.perf_counter() - t0
    model_px = sum(b * h * w for b, (h, w) in shapes)
    return {"mpx_s": round(shape[0] * shape[1] / dt / 1e6, 3),
            "model_mpx_s": round(model_px / dt / 1e6, 3), "seconds": round(dt, 3),
            "batches": len(shapes), "precision": p.precision}  # fmt: skip


def monai(slide: Path, ckpt: Path, size: dict[str, Any], a: Any, dev: Any) -> dict[str, Any]:
    """MONAI's sliding window over the whole slide (read and normalised on the host)."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return {"skipped": "monai is not importable (pip install monai)"}
    import torch

    from tilenet.config import InferConfig
    from tilenet.engine.predictor import Predictor
    from tilenet.geometry import Window
    from tilenet.io import open_image
    from tilenet.runtime import autocast

    p = Predictor(ckpt, InferConfig(device=str(dev), tile=size["tile"], precision=a.precision))
    grid, _ = p.plan((size["side"], size["side"]))
    overlap = 1 - grid.core[0] / grid.tile[0]  # the same recomputed margin as crop mode
    mean = torch.tensor(p.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(p.spec.std).view(1, 3, 1, 1)

    def predictor(t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(p.module(t.to(memory_format=torch.channels_last)).float(), dim=1)

    t0 = time.perf_counter()
    with open_image(slide) as img:
        h, w = img.levels[0].shape
        arr = img.read(Window(0, 0, h, w))
    x = (torch.from_numpy(arr).permute(2, 0, 1)[None].float() - mean) / std
    with torch.inference_mode(), autocast(dev, p.precision), _Nvml(dev.type == "cuda") as nvml:
        sliding_window_inference(x, roi_size=grid.tile, sw_batch_size=size["batch"],
                                 predictor=predictor, overlap=overlap, mode="constant",
                                 sw_device=dev, device="cpu")  # fmt: skip
        _sync(dev)
    dt = time.perf_counter() - t0
    return {"mpx_s": round(h * w / dt / 1e6, 3), "seconds": round(dt, 3),
            "overlap": round(overlap, 3), "busy_nvml_pct": nvml.mean()}  # fmt: skip


def train_steps(
    name: str, kwargs: dict[str, Any], size: dict[str, Any], dev: Any
) -> dict[str, Any]:
    """Training steps/s: bf16 autocast on a GPU that has it (else fp32), AdamW, CE loss."""
    import torch

    from tilenet.models import create_model
    from tilenet.runtime import autocast

    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=3, **kwargs).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, t = size["train_batch"], size["train_tile"]
    x = torch.randn(b, 3, t, t, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (b, t, t), device=dev)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = "bf16" if bf16 else "fp32"

    def step() -> None:
        with autocast(dev, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(size["steps"]):
        step()
    _sync(dev)
    dt = time.perf_counter() - t0
    return {"steps_s": round(size["steps"] / dt, 2), "batch": b, "tile": t,
            "precision": precision, "mpx_s": round(size["steps"] * b * t * t / dt / 1e6, 3)}  # fmt: skip


# -- the run --------------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI smoke run)")
    ap.add_argument("--out", default="bench_gpu.json", help="JSON written here")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--models", help=f"of {', '.join(MODELS)} (all; dry run: tiny)")
    ap.add_argument("--side", type=int, help="slide side in pixels (16384; dry run 512)")
    ap.add_argument("--readers", type=int, default=min(16, os.cpu_count() or 2),
                    help="reader threads of the e2e runs (all cores, at most 16)")  # fmt: skip
    ap.add_argument("--precision", default="auto", help="infer precision (auto: bf16 on GPUs)")
    ap.add_argument(
        "--skip", default="", help="parts to leave out: e2e,forward,monai,train,decode,codecs"
    )
    return ap.parse_args(argv)


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[str]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            yield tmp


def run(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; use --dry-run for the CPU smoke run")
    dev = torch.device("cpu" if a.dry_run else "cuda")
    size = dict(DRY if a.dry_run else FULL)
    if a.side:
        size["side"] = a.side
    skip = set(filter(None, a.skip.split(",")))
    import torchvision  # noqa: F401  (once, here: it takes seconds, and no part should pay it)

    slide = bu.make_tiff(Path(a.work) / f"slide_{size['side']}.tif", size["side"], distinct=64)
    res: dict[str, Any] = {"machine": bu.machine_info(), "device": str(dev), "dry_run": a.dry_run,
                           "slide": {"side": size["side"], "codec": "jpeg ycbcr 4:2:0", "tile": 512},
                           "sizes": size, "readers": a.readers, "models": {}}  # fmt: skip
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    if "codecs" not in skip:
        with _part(res, "codecs", a.out):
            res["codecs_cpu_1thread_mpx_s"] = codec_rates(size["codec_tile"], size["repeats"])
    if "decode" not in skip:
        with _part(res, "decode", a.out):
            res["decode"] = decode_alone(slide, dev, size["decode_batch"])
    models = a.models or ("tiny" if a.dry_run else ",".join(MODELS))
    for key in filter(None, models.split(",")):
        name, kwargs = MODELS[key]
        ckpt = bu.make_checkpoint(Path(a.work) / f"{key}.pt", name, kwargs)
        r: dict[str, Any] = {"model": name, "kwargs": kwargs}
        res["models"][key] = r  # filled in place: each part's write carries it
        if "forward" not in skip:
            with _part(res, f"{key}.forward", a.out):
                r["forward"] = forward(ckpt, (size["side"], size["side"]), size, a, dev)
        if "e2e" not in skip:
            with _part(res, f"{key}.e2e", a.out):
                if not a.dry_run:  # warm-up: cudnn autotune, nvJPEG handles, the allocator
                    e2e(slide, ckpt, "gpu", size, a, dev)
                r["e2e"] = {d: e2e(slide, ckpt, d, size, a, dev) for d in ("gpu", "cpu")}
        if "train" not in skip:
            with _part(res, f"{key}.train", a.out):
                r["train"] = train_steps(name, kwargs, size, dev)
        if "monai" not in skip:
            with _part(res, f"{key}.monai", a.out):
                r["monai"] = monai(slide, ckpt, size, a, dev)
        if "e2e" in r and r.get("forward", {}).get("mpx_s"):
            r["e2e_gpu_over_forward"] = round(r["e2e"]["gpu"]["mpx_s"] / r["forward"]["mpx_s"], 3)
        if "e2e" in r and r.get("monai", {}).get("mpx_s"):
            r["e2e_gpu_over_monai"] = round(r["e2e"]["gpu"]["mpx_s"] / r["monai"]["mpx_s"], 2)
    return res


def _line(res: dict[str, Any], out: str) -> str:
    parts = [f"bench_gpu {res.get('gpu', res['device'])}"]
    for key, r in res["models"].items():
        e = r.get("e2e", {})
        bits = [f"{key}:"]
        if e:
            bits.append(
                f"e2e gpu-decode {e['gpu']['mpx_s']} / cpu-decode {e['cpu']['mpx_s']} Mpx/s"
            )
            bits.append(f"busy {e['gpu']['busy_events']:.0%}")
        if "forward" in r:
            bits.append(f"forward {r['forward']['mpx_s']}")
        if r.get("monai", {}).get("mpx_s"):
            bits.append(f"monai {r['monai']['mpx_s']}")
        if "train" in r:
            bits.append(f"train {r['train']['steps_s']} steps/s")
        parts.append(" ".join(bits))
    if "decode" in res:
        parts.append(f"decode {res['decode']['device_mpx_s']} Mpx/s")
    return "; ".join(parts) + f" -> {out}"


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse(argv)
    with _workdir(a.work) as work:
        a.work = work
        res = run(a)
    bu.write_json(a.out, res)
    print(_line(res, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
