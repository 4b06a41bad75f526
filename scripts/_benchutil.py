"""Shared helpers of the bench scripts: test images, checkpoints, fresh-process runs, JSON.

Every contender of a benchmark runs in a fresh ``python`` subprocess that reports its own
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) as the last line of its stdout, so one
contender's heap never inflates another's figure.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GpuSampler",
    "child_report",
    "machine_info",
    "make_checkpoint",
    "make_tiff",
    "peak_rss_bytes",
    "run_child",
    "write_json",
]

TILE = 512


def _tile(iy: int, ix: int, rng: np.random.Generator, tile: int = TILE) -> np.ndarray:
    """Smooth structure plus noise: compresses roughly like stained tissue, not like zeros."""
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
    yy += iy * tile
    xx += ix * tile
    base = np.stack(
        [
            140 + 90 * np.sin(yy / 37.0) * np.cos(xx / 23.0),
            120 + 80 * np.cos((xx + yy) / 51.0),
            150 + 60 * np.sin(xx / 17.0),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def make_tiff(path: Path, side: int, *, compression: str = "jpeg", distinct: int = 0) -> Path:
    """A side x side RGB tiled TIFF (512² tiles), written tile by tile (never whole in RAM).

    ``distinct`` > 0 encodes only that many distinct JPEG tiles and repeats them, so a
    32768² image is written in seconds (decoding cost per tile is unchanged).
    """
    import tifffile

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    n = -(-side // TILE)
    if distinct:
        import imagecodecs

        enc = [imagecodecs.jpeg8_encode(_tile(i, i, rng), level=90) for i in range(distinct)]
        tiles: Iterator[Any] = (enc[i % distinct] for i in range(n * n))
        compression = "jpeg"
    else:
        tiles = (_tile(iy, ix, rng) for iy in range(n) for ix in range(n))
    tmp = path.with_name(f".{path.name}.tmp")
    tifffile.imwrite(
        tmp,
        tiles,
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(TILE, TILE),
        photometric="rgb",
        compression=compression,
        bigtiff=True,
        metadata=None,
    )
    os.replace(tmp, path)
    return path


def make_checkpoint(path: Path, name: str, kwargs: dict[str, Any], num_classes: int = 3) -> Path:
    """A tilenet checkpoint of registry model ``name`` with seeded random weights."""
    import torch

    from tilenet.engine.checkpoint import save_checkpoint
    from tilenet.models import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=num_classes, **kwargs)
    # BatchNorm running stats away from (0, 1) so eval-mode BN does something.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    spec = ModelSpec.from_model(model, mean=[128.0] * 3, std=[64.0] * 3)
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Reads ``VmHWM`` (the high-water mark of this address space) where /proc exists:
    ``ru_maxrss`` survives ``exec``, so a child spawned by a big parent would report at
    least the parent's RSS.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def child_report(result: dict[str, Any]) -> None:
    """In a child: print ``result`` plus this process's peak RSS and CPU time as JSON."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result = {**result, "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1)}
    result["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    print(json.dumps(result), flush=True)


def run_child(argv: list[str], *, timeout: float = 3600) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process; return its last stdout line as JSON."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode:
        raise RuntimeError(f"child {argv[:3]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = dict(json.loads(res.stdout.strip().splitlines()[-1]))
    out["process_s"] = round(time.perf_counter() - t0, 2)
    return out


def machine_info() -> dict[str, Any]:
    """CPU, memory, library versions and the load average (the machine may be shared)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_gib": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    for mod in ("monai", "pytorch_toolbelt"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


class GpuSampler:
    """Samples GPU utilisation with ``nvidia-smi -lms`` while the block runs (GPU busy %).

    Disabled (or without nvidia-smi) ``mean()`` is None. Written for GPU runs; unmeasured
    so far (no GPU on the development machine).
    """

    def __init__(self, *, enabled: bool = True, interval_ms: int = 100) -> None:
        self.enabled = enabled
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: Any = None

    def __enter__(self) -> GpuSampler:
        import shutil
        import threading

        if self.enabled and shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={self.interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            first = line.strip().split(",")[0].strip()
            if first.isdigit():
                self.samples.append(float(first))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=10)

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (atomically: temp file, then rename)."""
    from tilenet.fsutil import write_text_atomic

    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
