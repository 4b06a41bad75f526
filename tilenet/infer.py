"""Tiled inference: read tiles ahead in threads, run the model in batches, stitch out of core.

``infer_image(input, model, out_dir, **options)`` is what ``tilenet infer`` runs. The
checkpoint carries the model spec, normalisation and class names; the options are the
fields of :class:`tilenet.config.InferConfig`.

Geometry
--------
Tiles come from :class:`tilenet.geometry.TileGrid` with ``align`` = the model's total stride
and ``edge="clamp"``. In crop mode the halo is ``ceil_to(receptive_field, stride)``; each
tile's core is kept and its halo discarded. The model sees every read window exactly as it
would see that part of the whole image: read origins and sizes are multiples of the stride,
the < stride rows/columns past the image are zero *after* normalisation, and the network's
own zero padding at the image border is what it gets at a clamped edge tile. So crop-mode
output equals one forward pass over the whole image (zero-padded after normalisation to a
multiple of the stride, then cropped) to float rounding, for any network whose layers act
per pixel at inference (convolutions, eval-mode BatchNorm, pooling, interpolation).

What breaks exactness: normalisation whose statistics are taken over the input (GroupNorm,
InstanceNorm, LayerNorm over space) or global pooling, because a tile's statistics differ
from the whole image's; a ``halo`` override below the receptive field; and reduced precision
(bf16/fp16). Such models get a warning in crop mode; use ``mode="gaussian"`` for them.

Test-time augmentation (``tta``) averages the softmax over the four flips. A flipped read
window is still stride-aligned inside the flipped (stride-padded) image, so crop-mode TTA
equals whole-image TTA too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from tilenet.config import InferConfig
from tilenet.errors import ConfigError, InputError
from tilenet.fsutil import atomic_output, remove_path
from tilenet.geometry import Tile, TileGrid, Window, ceil_to
from tilenet.io.writers import OmeZarrWriter, write_ome_tiff, write_preview_png
from tilenet.pipeline import (
    BackgroundWriter,
    HeapGuard,
    keep_freed_memory,
    malloc_trim,
    map_large_buffers,
    prefetch,
)
from tilenet.stitch import BlendStitcher, CropStitcher, OutputSink, strip_order

if TYPE_CHECKING:
    import torch

__all__ = [
    "OUTPUTS",
    "batch_shapes",
    "infer_image",
    "plan_grid",
    "predict",
    "prepare_model",
    "resolve_options",
]

log = logging.getLogger(__name__)

#: Outputs ``--outputs`` may name.
OUTPUTS = ("probabilities", "classes", "instances", "preview", "geojson")

#: With ``heap="reuse"``: keep freed buffers mapped for reuse
#: (:func:`tilenet.pipeline.keep_freed_memory`) and hand free heap memory back every 8
#: batches (:class:`tilenet.pipeline.HeapGuard`) and at the end. Module constants so that
#: benchmarks can switch either off.
_KEEP_FREED = True
_TRIM = True

#: Width (pixels) of the vertical strips blend mode processes; bounds its open chunks.
_BLEND_STRIP_PX = 8192


# -- options --------------------------------------------------------------------------------
def resolve_options(options: dict[str, Any] | InferConfig | None = None) -> InferConfig:
    """Validate keyword options against :class:`InferConfig` (types, choices, unknown keys)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(options, InferConfig):
        options = asdict(options)
    options = dict(options or {})
    valid = sorted(f.name for f in fields(InferConfig))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown infer option {unknown[0]!r}; valid: {', '.join(valid)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(InferConfig), options)
        cfg: InferConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"invalid infer option {key!r}: {str(exc).splitlines()[0]}") from None
    bad = [o for o in cfg.outputs if o not in OUTPUTS]
    if bad:
        raise ConfigError(f"unknown output {bad[0]!r}; choose from {', '.join(OUTPUTS)}")
    if not 0 <= cfg.overlap < 1:
        raise ConfigError(f"overlap must be a fraction of the tile in [0, 1), got {cfg.overlap!r}")
    if cfg.tile <= 0 or cfg.batch <= 0:
        raise ConfigError(f"tile and batch must be positive, got {cfg.tile!r}, {cfg.batch!r}")
    if not 0 <= cfg.min_foreground <= 1:
        raise ConfigError(f"min_foreground must be in [0, 1], got {cfg.min_foreground!r}")
    return cfg


def plan_grid(
    shape: tuple[int, int], spec: dict[str, Any], cfg: InferConfig
) -> tuple[TileGrid, int]:
    """The tile grid for an image of ``shape`` and a model ``spec``; returns (grid, halo).

    In crop mode ``cfg.tile`` is the largest read window: the tile shrinks to the smallest
    stride multiple that still covers the image with as many tiles, so the last row and
    column of tiles do not recompute most of their neighbours (e.g. 4096² with a 128 px halo:
    6 x 6 tiles of 1024² = 2.25x the image at most; 944² tiles cover it in the same 36,
    1.91x). Any stride-aligned grid is exact, so this changes the work, not the output.

    >>> spec = {"stride": 16, "receptive_field": 40}
    >>> g, halo = plan_grid((1000, 700), spec, InferConfig(tile=256))
    >>> halo, g.tile, g.core, g.counts
    (48, (240, 240), (144, 144), (7, 5))
    >>> g, _ = plan_grid((1000, 700), spec, InferConfig(tile=256, mode="gaussian"))
    >>> g.tile, g.counts
    ((256, 256), (6, 4))
    """
    stride = max(1, int(spec["stride"]))
    rf = int(spec["receptive_field"])
    if cfg.tile % stride:
        raise InputError(
            f"tile {cfg.tile} must be a multiple of the model's stride {stride}; "
            f"try --tile {ceil_to(cfg.tile, stride)}"
        )
    if cfg.mode == "crop":
        halo = ceil_to(cfg.halo if cfg.halo is not None else rf, stride)
    else:
        halo = ceil_to(round(cfg.overlap * cfg.tile / 2), stride)
    if cfg.tile < 2 * halo + stride:
        suggest = max(ceil_to(4 * halo, stride), 2 * halo + stride)
        why = "the model's receptive field" if cfg.mode == "crop" else "--overlap"
        raise InputError(
            f"tile {cfg.tile} is too small for a halo of {halo} px on each side (from {why}); "
            f"use --tile {suggest} or larger"
        )
    tile = cfg.tile
    if cfg.mode == "crop":
        # The smallest core that keeps each axis's tile count (a stride multiple).
        core_max, core = cfg.tile - 2 * halo, stride
        for side in shape:
            n = math.ceil(side / core_max)
            core = max(core, ceil_to(math.ceil(side / n), stride))
        tile = min(cfg.tile, core + 2 * halo)
    return TileGrid(shape, tile, halo, align=stride, edge="clamp"), halo


# -- tensors --------------------------------------------------------------------------------
_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    tta: bool = False,
    regions: Sequence[Window] | None = None,
) -> Any:
    """Softmax probabilities (float32) of a batch ``x`` (B, C, h, w); TTA averages 4 flips.

    Without ``regions`` returns a (B, K, h, w) tensor. With one window per batch item (in
    ``x``'s coordinates) returns a list of (K, h_i, w_i) tensors: the softmax is computed only
    there (a tile's core in crop mode), which saves most of its cost.
    """
    import torch

    flips = _FLIPS if tta else ((),)
    total: list[torch.Tensor] | None = None
    for dims in flips:
        logits = model(torch.flip(x, dims) if dims else x)
        logits = torch.flip(logits, dims) if dims else logits
        if regions is None:
            parts = [torch.softmax(logits.float(), dim=1)]
        else:
            parts = [
                torch.softmax(logits[j, :, r.y : r.y1, r.x : r.x1].float(), dim=0)
                for j, r in enumerate(regions)
            ]
        total = parts if total is None else [t + p for t, p in zip(total, parts, strict=True)]
    assert total is not None
    if tta:
        total = [t / len(flips) for t in total]
    return total[0] if regions is None else total


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- model ----------------------------------------------------------------------------------
def _resolve_model(
    model: Any, device: torch.device
) -> tuple[torch.nn.Module, dict[str, Any], str | None]:
    """``model`` as a checkpoint path or a (module, spec) pair -> (module, spec, path)."""
    from tilenet.checkpoint import load_model

    if isinstance(model, str | os.PathLike):
        module, spec = load_model(model, device=device)
        return prepare_model(module), spec, str(model)
    try:
        module, spec = model
    except (TypeError, ValueError):
        raise InputError(
            f"model must be a checkpoint path or a (module, spec) pair, got {type(model).__name__}"
        ) from None
    # A caller's module is left as it was: fusion works on a copy (same device, same dtype).
    import copy

    return prepare_model(copy.deepcopy(module).to(device)), dict(spec), None


def prepare_model(module: torch.nn.Module) -> torch.nn.Module:
    """Make a loaded model ready for inference, in place: eval mode, BatchNorm folded into
    the convolutions before it (:func:`tilenet.models.fuse.fuse_conv_bn`), channels_last.

    Returns ``module``. The engine calls it once per loaded model; benchmarks call it so that
    "the model alone" is the same model the engine runs.
    """
    import torch

    from tilenet.models.fuse import fuse_conv_bn

    module.eval()
    if not getattr(module, "_tilenet_prepared", False):
        n = fuse_conv_bn(module)
        log.debug("folded %d BatchNorm layers into convolutions", n)
        module._tilenet_prepared = True  # type: ignore[assignment]
    return module.to(memory_format=torch.channels_last)


def _is_exact(module: Any) -> bool:
    """Whether the model's normalisation acts per pixel at inference (so crop mode is exact)."""
    import torch

    declared = getattr(module, "per_pixel_norm", None)
    if declared is not None:
        return bool(declared)
    stats = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.instancenorm._InstanceNorm)
    return not any(isinstance(m, stats) for m in module.modules())


# -- outputs --------------------------------------------------------------------------------
def _foreground_fractions(tiles: Sequence[Tile], image: Any, level: int) -> np.ndarray:
    """Fraction of each tile's core that is foreground on the tiler's low-resolution mask."""
    from tilenet.io.foreground import foreground_fractions as _foreground_fractions
    from tilenet.io.foreground import foreground_mask

    mask, mask_ds = foreground_mask(image)
    ds = image.levels[level].downsample
    return _foreground_fractions([t.core for t in tiles], mask, mask_ds, ds)


# -- the engine -----------------------------------------------------------------------------
def infer_image(
    input: Any,
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run tiled inference of ``model`` on ``input`` and write the outputs to ``out_dir``.

    ``input`` is a path (or an open :class:`~tilenet.io.base.LazyImage`); ``model`` a
    checkpoint path or a ``(module, spec)`` pair; ``options`` are :class:`InferConfig`
    fields. Returns the summary also written to ``out_dir/summary.json``.
    """
    cfg = resolve_options(options)
    t_start = time.perf_counter()
    out = Path(out_dir)
    if isinstance(input, str | os.PathLike):
        from tilenet.io import open_image

        image = open_image(input)
    else:
        image = input
    try:
        return _run(image, model, out, cfg, progress=progress, t_start=t_start)
    finally:
        if image is not input:
            image.close()


def _run(
    image: Any, model: Any, out: Path, cfg: InferConfig, *, progress: bool, t_start: float
) -> dict[str, Any]:
    import torch

    from tilenet import __version__

    if not 0 <= cfg.level < len(image.levels):
        raise InputError(
            f"{image.path}: level {cfg.level} does not exist; the image has levels "
            f"0..{len(image.levels) - 1}"
        )
    device = _device(cfg.device)
    module, spec, ckpt_path = _resolve_model(model, device)
    k = int(spec["num_classes"])
    if int(spec["in_channels"]) != image.channels:
        raise InputError(
            f"{image.path}: image has {image.channels} channels but the model expects "
            f"{spec['in_channels']}"
        )
    if k > 255:
        raise InputError(f"model has {k} classes; class maps are uint8 (at most 255)")
    exact = _is_exact(module)
    if cfg.mode == "crop" and not exact:
        log.warning(
            "model %s normalises over each tile (GroupNorm/InstanceNorm or similar): crop mode "
            "is not exact for it; prefer --mode gaussian",
            spec["name"],
        )
    shape = image.levels[cfg.level].shape
    grid, halo = plan_grid(shape, spec, cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    names = [str(n) for n in (spec.get("class_names") or [f"class_{i}" for i in range(k)])]
    ds = image.levels[cfg.level].downsample
    pixel_size = None
    if image.pixel_size:
        pixel_size = (image.pixel_size[0] * ds[0], image.pixel_size[1] * ds[1])
    want = set(cfg.outputs)
    out.mkdir(parents=True, exist_ok=True)
    spill = out / f".infer-spill-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        # Writers live at temporary siblings until finalize() renames them; on an error
        # their context exit removes them, so nothing half-written looks complete.
        prob_w = None
        if "probabilities" in want:
            prob_w = stack.enter_context(
                OmeZarrWriter(
                    out / "probabilities.ome.zarr",
                    shape=(k, *shape),
                    dtype=cfg.probabilities_dtype,
                    axes="cyx",
                    chunks=grid.core[0],  # output chunk = tile core: one writer per chunk
                    pixel_size=pixel_size,
                    name="probabilities",
                    channel_names=names,
                    overwrite=True,
                )
            )
        cls_w = stack.enter_context(
            OmeZarrWriter(
                out / "classes.ome.zarr",
                shape=shape,
                dtype="uint8",
                axes="yx",
                chunks=grid.core[0],
                pixel_size=pixel_size,
                name="classes",
                overwrite=True,
            )
        )
        stack.callback(remove_path, spill)
        sink = OutputSink(
            num_classes=k,
            probabilities=prob_w.array if prob_w else None,
            classes=cls_w.array,
            probabilities_dtype=cfg.probabilities_dtype,
        )
        if cfg.mode == "crop":
            stitcher: CropStitcher | BlendStitcher = CropStitcher(sink)
            tiles = list(grid)
        else:
            strip = _strip_tiles(grid)
            stitcher = BlendStitcher(grid, sink, mode=cfg.mode, spill_dir=spill, strip_tiles=strip)
            tiles = stitcher.order
        skip = np.zeros(len(tiles), dtype=bool)
        if cfg.min_foreground > 0:
            skip = _foreground_fractions(tiles, image, cfg.level) < cfg.min_foreground
        t_model, c_model = time.perf_counter(), time.process_time()
        stats = _execute(image, module, spec, grid, tiles, skip, stitcher, cfg, device, progress)
        stitcher.close()
        t_written, c_written = time.perf_counter(), time.process_time()
        paths: dict[str, Path] = {}
        if prob_w is not None:
            paths["probabilities"] = prob_w.finalize(method="mean")
        classes_path = cls_w.finalize(method="mode")
        paths["classes"] = classes_path
        n_instances = _extra_outputs(image, out, classes_path, cfg, names, pixel_size, paths)
    t_end = time.perf_counter()

    n_run = int((~skip).sum())
    names = list(spec.get("class_names") or [f"class_{i}" for i in range(k)])
    ds = image.levels[cfg.level].downsample
    px_area = None
    if image.pixel_size:
        px_area = image.pixel_size[0] * ds[0] * image.pixel_size[1] * ds[1]
    summary: dict[str, Any] = {
        "tilenet_version": __version__,
        "input": str(image.path),
        "model": ckpt_path or spec["name"],
        "model_name": spec["name"],
        "shape": list(shape),
        "level": cfg.level,
        "mode": cfg.mode,
        "exact": bool(exact and cfg.mode == "crop" and cfg.precision == "fp32"),
        "tile": grid.tile[0],  # as run (crop mode may shrink the requested tile)
        "halo": halo,
        "stride": int(spec["stride"]),
        "receptive_field": int(spec["receptive_field"]),
        "tiles": len(tiles),
        "tiles_run": n_run,
        "tiles_skipped": len(tiles) - n_run,
        "device": str(device),
        "precision": cfg.precision,
        "class_names": names,
        "class_area_px": {n: int(a) for n, a in zip(names, sink.area, strict=False)},
        "class_area_um2": (
            {n: float(a * px_area) for n, a in zip(names, sink.area, strict=False)}
            if px_area
            else None
        ),
        "instances": n_instances
        and {
            "count": int(n_instances["count"]),
            "per_class": {
                names[int(c)]: int(n) for c, n in n_instances.get("per_class_counts", {}).items()
            },
        },
        "timings": {
            "setup_s": round(t_model - t_start, 3),
            "tiles_s": round(t_written - t_model, 3),
            # CPU seconds of all threads in the tile phase (robust to a busy machine).
            "tiles_cpu_s": round(c_written - c_model, 3),
            "finalize_s": round(t_end - t_written, 3),
            "total_s": round(t_end - t_start, 3),
            "model_s": round(stats["model_s"], 3),
            "read_wait_s": round(stats["read_wait_s"], 3),
            "heap_trims": int(stats["heap_trims"]),
        },
        "tiles_per_s": round(len(tiles) / max(t_written - t_model, 1e-9), 3),
        "outputs": {name: str(p) for name, p in paths.items()},
    }
    summary["outputs"]["config"] = str(out / "config.yaml")
    summary["outputs"]["summary"] = str(out / "summary.json")
    _write_text(out / "config.yaml", _config_yaml(cfg, ckpt_path))
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _strip_tiles(grid: TileGrid) -> int:
    """Tile columns per vertical strip in blend modes."""
    return max(1, _BLEND_STRIP_PX // grid.core[1])


def batch_shapes(grid: TileGrid, cfg: InferConfig) -> list[tuple[int, tuple[int, int]]]:
    """(batch size, read shape) of every model batch the engine runs over ``grid``.

    The engine's own order and grouping (no tiles skipped), for benchmarks that time the
    model alone on exactly the batches :func:`infer_image` runs.

    >>> spec = {"stride": 16, "receptive_field": 40}
    >>> g, _ = plan_grid((1000, 700), spec, InferConfig(tile=256, batch=4))
    >>> batch_shapes(g, InferConfig(tile=256, batch=4))[:3]
    [(4, (240, 240)), (1, (240, 240)), (4, (240, 240))]
    """
    crop = cfg.mode == "crop"
    tiles = list(grid) if crop else strip_order(grid, _strip_tiles(grid))
    items = (((i, t, False), None) for i, t in enumerate(tiles))
    return [(len(b), b[0][0].read.shape) for b in _batches(items, cfg.batch, by_row=crop)]


def _batches(
    items: Iterator[tuple[tuple[int, Tile, bool], np.ndarray | None]],
    size: int,
    *,
    by_row: bool = False,
) -> Iterator[list[tuple[Tile, bool, np.ndarray | None]]]:
    """Group consecutive tiles into batches of equal read shape (skipped tiles pass alone).

    ``by_row``: a batch never spans two grid rows, so a run over a band of whole rows
    batches its tiles exactly as a run over the whole grid does (oneDNN's results can
    depend on the batch size in the last bit; this keeps banded runs bit-identical).
    """
    batch: list[tuple[Tile, bool, np.ndarray | None]] = []
    for (_, tile, skipped), arr in items:
        if batch and (
            len(batch) >= size
            or skipped
            or batch[-1][1]
            or batch[-1][0].read.shape != tile.read.shape
            or (by_row and batch[-1][0].index[0] != tile.index[0])
        ):
            yield batch
            batch = []
        batch.append((tile, skipped, arr))
    if batch:
        yield batch


def _execute(
    image: Any,
    module: torch.nn.Module,
    spec: dict[str, Any],
    grid: TileGrid,
    tiles: list[Tile],
    skip: np.ndarray,
    stitcher: CropStitcher | BlendStitcher,
    cfg: InferConfig,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    import torch
    from tqdm.auto import tqdm

    h, w = grid.shape
    k = int(spec["num_classes"])
    crop = cfg.mode == "crop"
    pin = device.type == "cuda"
    c = int(spec["in_channels"])
    mean = torch.tensor(spec.get("mean") or [0.0] * c, dtype=torch.float32, device=device)
    inv_std = 1.0 / torch.tensor(spec.get("std") or [1.0] * c, dtype=torch.float32)
    mean, inv_std = mean.view(1, c, 1, 1), inv_std.to(device).view(1, c, 1, 1)
    # uint8 tiles travel as uint8 (4x fewer bytes to the device, 4x less read-ahead memory)
    # and are normalised there; other dtypes become float32 here (torch lacks uint16 ops).
    keep_raw = np.dtype(image.dtype) == np.uint8

    def read(item: tuple[int, Tile, bool]) -> np.ndarray | None:
        _, tile, skipped = item
        if skipped:
            return None
        raw = image.read(tile.read, cfg.level)
        return raw if keep_raw else raw.astype(np.float32)

    def to_input(batch: list[tuple[Tile, bool, np.ndarray | None]]) -> torch.Tensor:
        """Raw (B, h, w, C) tiles -> normalised channels_last (B, C, h, w) on the device."""
        x = torch.from_numpy(np.stack([cast(np.ndarray, a) for _, _, a in batch]))
        if pin:
            x = x.pin_memory()
        # NHWC memory viewed as NCHW is channels_last: no copy, and the ops below keep it.
        x = x.to(device, non_blocking=pin).permute(0, 3, 1, 2).float()
        x.sub_(mean).mul_(inv_std)  # in place: same arithmetic as (x - mean) * inv_std
        for j, (tile, _, _) in enumerate(batch):
            # Past the image (alignment rows) the input is zero *after* normalisation, like
            # the network's own zero padding at the image border.
            r = tile.read
            x[j, :, max(0, h - r.y) :, :] = 0
            x[j, :, :, max(0, w - r.x) :] = 0
        return x

    def background(tile: Tile) -> np.ndarray:
        win = tile.core if crop else tile.read.clip(h, w)
        p = np.zeros((k, win.h, win.w), np.float32)
        p[0] = 1.0
        return p

    def region(tile: Tile) -> Window:
        # What the stitcher takes, in read-window coordinates.
        return tile.core_in_read if crop else tile.read.clip(h, w).relative_to(tile.read)

    stats = {"model_s": 0.0, "read_wait_s": 0.0}
    reuse = cfg.heap == "reuse"
    if not reuse:
        map_large_buffers()  # process-wide; flat peak RSS at some CPU speed
    elif _KEEP_FREED:
        keep_freed_memory()  # process-wide; each batch reuses the last one's activations
    items = [(i, t, bool(skip[i])) for i, t in enumerate(tiles)]
    depth = max(2 * cfg.batch, 2 * cfg.readers)
    bar = tqdm(total=len(tiles), unit="tile", disable=not progress, desc="infer")
    with BackgroundWriter[tuple[Any, ...]](
        lambda job: stitcher.add(*job), depth=2 * cfg.batch
    ) as writer:
        reads = prefetch(items, read, workers=cfg.readers, depth=depth)
        it = _batches(reads, cfg.batch, by_row=crop)
        t0 = time.perf_counter()
        guard = HeapGuard()
        for batch in it:
            stats["read_wait_s"] += time.perf_counter() - t0
            if batch[0][1]:
                for tile, _, _ in batch:
                    writer.submit((tile, background(tile)))
            else:
                t1 = time.perf_counter()
                x = to_input(batch)
                regions = [region(tile) for tile, _, _ in batch]
                with torch.inference_mode(), _autocast(device, cfg.precision):
                    probs = predict(module, x, tta=cfg.tta, regions=regions)
                for (tile, _, _), p in zip(batch, probs, strict=True):
                    writer.submit((tile, p.contiguous().cpu().numpy()))
                stats["model_s"] += time.perf_counter() - t1
                if _TRIM and reuse:
                    guard.check()  # keeps peak RSS flat on huge images (see pipeline)
            bar.update(len(batch))
            t0 = time.perf_counter()
    bar.close()
    if _TRIM:
        malloc_trim()  # what the tiles left free goes back to the OS
    stats["heap_trims"] = float(guard.trims)
    return stats


def _extra_outputs(
    image: Any,
    out: Path,
    classes_path: Path,
    cfg: InferConfig,
    names: list[str],
    pixel_size: tuple[float, float] | None,
    paths: dict[str, Path],
) -> dict[str, Any] | None:
    """OME-TIFF, preview, instances and GeoJSON, all made from the finished class map.

    Returns the instance counts (None when instances were not made); adds to ``paths``.
    """
    import zarr

    want = set(cfg.outputs)
    classes = zarr.open_group(classes_path, mode="r")
    if "classes" in want:
        paths["classes_tiff"] = write_ome_tiff(
            out / "classes.ome.tif",
            classes["0"],
            axes="yx",
            compression="zlib",
            method="mode",
            pixel_size=pixel_size,
        )
    if "preview" in want:
        # The overlay needs the image at the inferred level; only level 0 is addressable as
        # its own source, so other levels preview the class map alone.
        base = image if cfg.level == 0 else classes["0"]
        paths["preview"] = write_preview_png(out / "preview.png", base, overlay=classes["0"])
    if not want & {"instances", "geojson"}:
        return None
    from tilenet import instances

    result = instances.label_instances(
        classes["0"], out / "instances.ome.zarr", foreground=range(1, len(names)), chunk=cfg.chunk
    )
    paths["instances"] = out / "instances.ome.zarr"
    if "geojson" in want:
        ds = image.levels[cfg.level].downsample
        instances.write_geojson(
            paths["instances"],
            out / "instances.geojson",
            class_names=names,
            downsample=float(ds[0]),
        )
        paths["geojson"] = out / "instances.geojson"
    return result


def _config_yaml(cfg: InferConfig, checkpoint: str | None) -> str:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    text = OmegaConf.to_yaml(OmegaConf.create({"infer": node}), resolve=True)
    return text + (f"# model: {checkpoint}\n" if checkpoint else "")


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
