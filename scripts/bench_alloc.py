"""Allocator configurations for tiled inference: speed (wall, CPU s) and peak RSS by image size.

Each (config, size) runs ``tilenet.infer_image`` in a fresh process; configs are interleaved
and repeated so that load from other processes on a shared machine hits them alike. Configs:

* ``tilenet``: the engine as it is: freed buffers kept mapped for reuse
  (``tilenet.runtime.heap_policy("reuse")``: mmap threshold 256 MiB, trim threshold 1 GiB) and
  ``malloc_trim(0)`` every 8 model batches (``tilenet.runtime.HeapGuard``);
* ``flat``: the engine with ``heap="flat"`` (every buffer above 128 KiB its own mapping);
* ``trim_only``: glibc defaults plus the engine's ``HeapGuard`` trimming;
* ``default``: glibc defaults, the engine's settings switched off;
* ``fixed128k``: a fixed ``M_MMAP_THRESHOLD`` of 128 KiB, no trimming (the engine's setting
  before 2026-11-23: every large buffer its own mapping);
* ``keep``: ``M_MMAP_MAX=0`` + ``M_TRIM_THRESHOLD`` huge: freed buffers stay mapped, reused;
* ``keep_a2`` / ``keep_a1``: ``keep`` + ``M_ARENA_MAX=2`` / ``1``;
* ``thr64m``: fixed ``M_MMAP_THRESHOLD`` of 64 MiB (above any per-batch tensor here);
* ``tilenet_thp`` / ``default_thp``: those with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU
  allocator madvises large buffers as transparent huge pages; needs THP ``madvise``).

    python scripts/bench_alloc.py --sizes 4096,8192 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu

CONFIGS = (
    "tilenet",
    "flat",
    "trim_only",
    "default",
    "fixed128k",
    "keep",
    "keep_a2",
    "keep_a1",
    "thr64m",
    "tilenet_thp",
    "default_thp",
)
# mallopt parameters from <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8


def _apply(config: str) -> None:
    """Set glibc options before torch starts threads (arenas are made per thread)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if config in ("keep", "keep_a2", "keep_a1"):
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)
    if config in ("keep_a2", "keep_a1"):
        libc.mallopt(M_ARENA_MAX, int(config[-1]))
    if config.endswith("_thp"):
        # PyTorch's CPU allocator madvises buffers >= 2 MiB as huge pages (read once, at
        # torch's first allocation): one page fault per 2 MiB instead of per 4 KiB.
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if config == "thr64m":
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    if config == "fixed128k":
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)


def child(a: dict[str, Any]) -> dict[str, Any]:
    _apply(a["config"])
    import omegaconf  # noqa: F401
    import zarr  # noqa: F401

    import tilenet.engine.infer
    import tilenet.io
    import tilenet.io.writers
    import tilenet.models  # noqa: F401  (imported before the clock)
    from tilenet.engine.infer import infer_image

    opts = dict(a["opts"])
    if a["config"] == "flat":
        opts["heap"] = "flat"
    elif not a["config"].startswith("tilenet"):
        # The engine's allocator setting off ("trim": its malloc_trim kept; "system": off too).
        opts["heap"] = "trim" if a["config"] == "trim_only" else "system"
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    s = infer_image(a["image"], a["ckpt"], a["out"], **opts)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": round(wall, 2),
        "infer_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
        "infer_sys_s": round(ru1.ru_stime - ru0.ru_stime, 2),
        "minflt": ru1.ru_minflt - ru0.ru_minflt,
        "tiles": s["tiles"],
        "model_s": s["timings"]["model_s"],
        # Bands whose reuse heap passed its ceiling and finished flat (runtime.HeapGuard).
        "heap_went_flat": s["timings"].get("heap_went_flat", 0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="4096,8192")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--model-kwargs", default='{"width": 8}', help="JSON kwargs")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--mode", default="gaussian", choices=("crop", "gaussian", "linear"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="bench_results/bench_alloc.json")
    opt = ap.parse_args(argv)
    if opt.child:
        bu.child_report(child(json.loads(opt.child)))
        return 0
    sizes = [int(v) for v in opt.sizes.split(",")]
    configs = [c for c in opt.configs.split(",") if c]
    work = Path(tempfile.mkdtemp(prefix="bench_alloc-"))
    kwargs = json.loads(opt.model_kwargs)
    ckpt = bu.make_checkpoint(work / "m.pt", opt.model, kwargs)
    opts = {
        "tile": opt.tile,
        "mode": opt.mode,
        "batch": opt.batch,
        "device": "cpu",
        "outputs": ["classes"],
    }
    result: dict[str, Any] = {
        "machine": bu.machine_info(),
        "model": {"name": opt.model, "kwargs": kwargs},
        "settings": opts,
        "runs": [],
    }
    try:
        imgs = {s: bu.make_tiff(work / f"img_{s}.tif", s, distinct=16) for s in sizes}
        for rep in range(opt.repeats):
            for side in sizes:
                order = configs if rep % 2 == 0 else configs[::-1]
                for cfg in order:
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    arg = {
                        "image": str(imgs[side]),
                        "ckpt": str(ckpt),
                        "out": str(out),
                        "opts": opts,
                        "config": cfg,
                    }
                    r = bu.run_child([__file__, "--child", json.dumps(arg)])
                    row = {"config": cfg, "side": side, "rep": rep, **r}
                    row["loadavg_1min"] = round(os.getloadavg()[0], 2)
                    result["runs"].append(row)
                    print(
                        f"{cfg:8s} {side}²: wall {r['wall_s']} s, cpu {r['infer_cpu_s']} s "
                        f"(sys {r['infer_sys_s']}), minflt {r['minflt']}, "
                        f"peak RSS {r['peak_rss_mb']} MB, load {row['loadavg_1min']}",
                        flush=True,
                    )
                    bu.write_json(opt.out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = []
    for cfg in configs:
        parts = []
        for side in sizes:
            rows = [r for r in result["runs"] if r["config"] == cfg and r["side"] == side]
            parts.append(
                f"{side}² cpu {min(r['infer_cpu_s'] for r in rows)} s "
                f"rss {max(r['peak_rss_mb'] for r in rows)} MB"
            )
        summary.append(f"{cfg}: " + ", ".join(parts))
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    bu.write_json(opt.out, result)
    print("bench_alloc: " + "; ".join(summary) + f" -> {opt.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
