"""Tiled inference of one image: plan, run bands of tiles, finish; resumable after a kill.

``infer_image(input, model, out_dir, config=InferConfig(...))`` is what ``tilenet infer``
runs; keyword options (the fields of :class:`tilenet.config.InferConfig`) work too. It is
three public steps, which batch jobs (:mod:`tilenet.jobs`) run the same way, on dask workers
when asked:

1. :func:`plan_image` plans the tile grid (:func:`tilenet.engine.tiles.plan_grid`), splits it
   into bands of whole grid rows (crop mode; blend modes are one band), and prepares the
   outputs (:class:`tilenet.outputs.outputset.OutputSet` on a folder or a bucket prefix): the
   level-0 stores the asked-for formats read, reopened when an earlier run with the same
   input, model and options (:class:`tilenet.outputs.resume.ResumeKey`) was interrupted.
2. :func:`run_band` runs one band's tiles through a :class:`tilenet.engine.predictor.Predictor`
   into the partial stores and records the band as finished. Bands write disjoint output
   chunks, so they may run in any order and in different processes.
3. :func:`finish` builds the stores' pyramids, writes every asked-for format
   (:data:`tilenet.outputs.formats.FORMATS`), then ``config.yaml`` and ``summary.json``.

A run killed with SIGKILL and started again with the same command keeps the bands, steps
and resume points it had recorded and ends with outputs identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any

from tilenet.config import InferConfig, JobsConfig, ReaderConfig, ResolutionConfig, merge_options
from tilenet.engine.blendsteps import run_blend, step_record
from tilenet.engine.checkpoint import check_input_range
from tilenet.engine.decode import decode_summary
from tilenet.engine.pace import CHECKPOINT_S, Pace, add_step, tiles_here, timings
from tilenet.engine.perimage import skip_mask, stain_for
from tilenet.engine.plan import check_disk
from tilenet.engine.predictor import Predictor
from tilenet.engine.stitch import STITCHERS
from tilenet.engine.tiles import plan_grid, strip_tiles, tile_order
from tilenet.errors import ConfigError, InputError, one_line
from tilenet.geometry import GeoTransform, Tile, TileGrid, spans
from tilenet.io.location import location
from tilenet.io.lock import exclusive_output
from tilenet.io.storage import redact
from tilenet.models.spec import ModelSpec
from tilenet.outputs.formats import FORMATS
from tilenet.outputs.outputset import (
    CLASSES_NODATA,
    OutputSet,
    planned_bytes,
    reclaimable_bytes,
)
from tilenet.outputs.resume import ResumeKey
from tilenet.progress import progress_bar

__all__ = [
    "REGION_TILES",
    "ImagePlan",
    "bands_of",
    "choose_bands",
    "choose_resolution",
    "finish",
    "infer_image",
    "plan_image",
    "resolve_options",
    "resume_key",
    "run_band",
    "select_input_bands",
]

log = logging.getLogger(__name__)

#: Default tiles per band: the unit of resume (and of parallel work in batch jobs).
REGION_TILES = JobsConfig.region_tiles


def select_input_bands(image: Any, cfg: InferConfig) -> Any:
    """``image`` with the input bands (channels) ``cfg.bands`` picked, once; as is without.

    (Spectral bands of the input, not the row bands a plan is run in.)
    """
    from tilenet.io.view import view

    return view(image, bands=cfg.bands).image


def choose_bands(image: Any, spec: ModelSpec, cfg: InferConfig) -> tuple[InferConfig, str | None]:
    """``cfg`` with the input bands to run, and where they came from.

    ``cfg.bands`` when given ("requested"); else the bands the model was trained on
    (``spec.bands``, recorded in the checkpoint: "checkpoint"); else all bands (None). An
    image without the checkpoint's bands is refused in one line.
    """
    if cfg.bands:
        return cfg, "requested"
    if not spec.bands:
        return cfg, None
    bands = list(spec.bands)
    if image.metadata.get("bands") != bands and max(bands) > image.channels:
        raise InputError(
            f"{image.path}: the model was trained on bands {','.join(map(str, bands))} "
            f"(recorded in its checkpoint) but the image has bands 1..{image.channels}; "
            "give --bands to pick others"
        )
    return dataclasses.replace(cfg, bands=bands), "checkpoint"


# -- options --------------------------------------------------------------------------------
def resolve_options(
    options: dict[str, Any] | InferConfig | None = None, *, config: InferConfig | None = None
) -> InferConfig:
    """Validate keyword options against :class:`InferConfig` (types, choices, unknown keys).

    ``config`` is a typed config to start from (the defaults when None); ``options`` are
    merged onto it. A ``config`` with no options is checked and comes back as it is, the same
    object, when its values are already clean (a loose ``tile="12"`` comes back coerced).
    """
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(options, InferConfig):
        options = asdict(options)
    options = dict(options or {})
    valid = sorted(f.name for f in fields(InferConfig))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown infer option {unknown[0]!r}; valid: {', '.join(valid)}")
    try:
        cfg: InferConfig = merge_options(InferConfig, config, options)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"invalid infer option {key!r}: {one_line(exc, typed=False)}") from None
    bad = [o for o in cfg.outputs if o not in FORMATS]
    if bad:
        raise ConfigError(f"unknown output {bad[0]!r}; choose from {', '.join(FORMATS)}")
    if not 0 <= cfg.overlap < 1:
        raise ConfigError(f"overlap must be a fraction of the tile in [0, 1), got {cfg.overlap!r}")
    if cfg.tile <= 0 or cfg.batch <= 0:
        raise ConfigError(f"tile and batch must be positive, got {cfg.tile!r}, {cfg.batch!r}")
    if not 0 <= cfg.min_foreground <= 1:
        raise ConfigError(f"min_foreground must be in [0, 1], got {cfg.min_foreground!r}")
    if not 0 <= cfg.tissue <= 1:
        raise ConfigError(f"tissue must be in [0, 1], got {cfg.tissue!r}")
    return config if config is not None and cfg == config else cfg


def resume_key(
    input: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None,
    cfg: InferConfig,
    *,
    fingerprint: str | None = None,
    resolution: dict[str, Any] | None = None,
) -> ResumeKey:
    """What an image's outputs are computed from: input fingerprint, model, options, version.

    Partial outputs are resumed only under an equal key. Without a checkpoint file (a module
    given in memory) the key is unique to this call, so nothing is ever resumed.
    ``fingerprint``: the input's, when already known.
    """
    from tilenet.engine.checkpoint import file_checksum
    from tilenet.io import fingerprint as fingerprint_of

    return ResumeKey.of(
        fingerprint if fingerprint is not None else fingerprint_of(input),
        file_checksum(checkpoint) if checkpoint else uuid.uuid4().hex,
        cfg,
        resolution=resolution,
    )


def bands_of(rows: int, cols: int, region_tiles: int) -> list[tuple[int, int]]:
    """Bands of whole grid rows with about ``region_tiles`` tiles each.

    >>> bands_of(5, 4, 8)
    [(0, 2), (2, 4), (4, 5)]
    """
    return spans(rows, max(1, region_tiles // max(1, cols)))


# -- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to run and finish one image's inference (plain data: picklable)."""

    input: str
    out: str
    config: InferConfig
    spec: ModelSpec
    #: The checkpoint path, or None for a model given in memory.
    model: str | None
    grid: TileGrid
    halo: int
    #: Downsample of the inferred level relative to level 0, and its pixel size (µm) if known.
    downsample: tuple[float, float]
    pixel_size: tuple[float, float] | None
    bands: tuple[tuple[int, int], ...]
    outputs: OutputSet
    #: Wall-clock time (``time.time()``) when planning began.
    t0: float
    #: How the input is opened again (in a worker process, for each band and for finish).
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    #: The target pixel size run at (None: the image's level ``config.level`` as is), and
    #: how it was chosen (``summary.json``'s ``resolution``).
    resolution: ResolutionConfig | None = None
    resolution_info: dict[str, Any] | None = None
    #: Where ``config.bands`` came from: "requested", "checkpoint" or None (all bands).
    bands_from: str | None = None

    def open(self) -> Any:
        """Open the input image (a context manager), with the plan's reader limits."""
        from tilenet.io import open_image

        return self.view(open_image(self.input, **asdict(self.reader)))

    def view(self, image: Any) -> Any:
        """``image`` as the plan runs it (:func:`tilenet.io.view.view`): input bands picked,
        at the plan's pixel size; an image already so is returned as it is."""
        from tilenet.io.view import view

        cfg = self.config
        return view(image, bands=cfg.bands, resolution=self.resolution, level=cfg.level).image

    @property
    def pending(self) -> list[int]:
        """Indices of the bands still to run (finished ones of an earlier run are kept)."""
        return [i for i in range(len(self.bands)) if i not in self.outputs.resumed]

    def tiles(self, band: int, *, rows: tuple[int, int] | None = None) -> list[Tile]:
        """The tiles of ``band`` (of its grid ``rows`` only, in crop mode) in the order the
        engine runs them."""
        if self.config.mode != "crop":
            return tile_order(self.grid, self.config.mode)
        r0, r1 = rows if rows is not None else self.bands[band]
        return [t for r in range(r0, r1) for t in self.grid.row(r)]


def plan_image(
    image: Any,
    spec: ModelSpec | dict[str, Any],
    cfg: InferConfig,
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    region_tiles: int = REGION_TILES,
    key: ResumeKey | None = None,
    force: bool = False,
    reader: ReaderConfig | None = None,
    resolution: ResolutionConfig | None = None,
) -> ImagePlan:
    """Plan ``image`` (an open LazyImage) for a model and prepare its outputs in ``out``.

    ``spec`` is the model's spec, ``model`` its checkpoint path (None for a model in
    memory). ``key`` identifies what the outputs are computed from (:func:`resume_key`; made
    here when not given). Partial outputs of an earlier run with the same key and band
    layout are kept; ``force`` discards them. ``reader`` holds the limits the input is
    opened with again by :meth:`ImagePlan.open`. ``resolution`` sets the pixel size to run
    at (:mod:`tilenet.io.resolution`); without a target there, the one the checkpoint was
    trained at is used where the image has a pixel size (see :func:`choose_resolution`).
    """
    t0 = time.time()
    spec = ModelSpec.coerce(spec)
    cfg, bands_from = choose_bands(image, spec, cfg)
    target, res_info = choose_resolution(image, spec, cfg, resolution or ResolutionConfig())
    from tilenet.io.view import view

    viewed = view(image, bands=cfg.bands, resolution=target, level=cfg.level)
    image = viewed.image
    if viewed.resolution is not None:
        res_info = {**res_info, **viewed.resolution.to_dict()}
    if spec.in_channels != image.channels:
        raise InputError(
            f"{image.path}: image has {image.channels} channels but the model expects "
            f"{spec.in_channels}"
        )
    check_input_range(image, spec)  # a warning, where the image is on another scale
    shape = image.levels[cfg.level].shape
    grid, halo = plan_grid(shape, spec, cfg)
    rows, cols = grid.counts
    bands = bands_of(rows, cols, region_tiles) if cfg.mode == "crop" else [(0, rows)]
    checkpoint = str(model) if model is not None else None
    if key is None:
        key = resume_key(image.path, checkpoint, cfg)
    key = key.planned(
        band_rows=bands[0][1] - bands[0][0],
        mode=cfg.mode,
        resolution=asdict(target) if target is not None else None,
    )
    ds = image.levels[cfg.level].downsample
    pixel_size = None
    if image.pixel_size:
        pixel_size = (image.pixel_size[0] * ds[0], image.pixel_size[1] * ds[1])
    loc = location(out)
    if cfg.disk_check and loc.local is not None:  # refused before anything is written
        georeferenced = getattr(image, "transform", None) is not None
        need = planned_bytes(
            shape,
            spec.num_classes,
            cfg.outputs,
            cfg.probabilities_dtype,
            georeferenced=georeferenced,
        )
        mine = partial(reclaimable_bytes, loc)  # walked only if the free space is too little
        check_disk(loc.local, need, what=str(image.path), reclaimable=mine)
    outputs = OutputSet.prepare(
        loc,
        key=key,
        shape=shape,
        chunk=grid.core[0],  # output chunk = tile core: one writer per chunk
        class_names=spec.class_names,
        cfg=cfg,
        pixel_size=pixel_size,
        bands=bands,
        force=force,
    )
    return ImagePlan(
        input=str(image.path),
        out=outputs.url,
        config=cfg,
        spec=spec,
        model=checkpoint,
        grid=grid,
        halo=halo,
        downsample=(float(ds[0]), float(ds[1])),
        pixel_size=pixel_size,
        bands=tuple(bands),
        outputs=outputs,
        t0=t0,
        reader=reader if reader is not None else ReaderConfig(),
        resolution=target,
        resolution_info=res_info,
        bands_from=bands_from,
    )


def choose_resolution(
    image: Any, spec: ModelSpec, cfg: InferConfig, resolution: ResolutionConfig
) -> tuple[ResolutionConfig | None, dict[str, Any]]:
    """The target pixel size to run ``image`` at, and how it was chosen.

    A target in ``resolution`` wins ("requested"). Without one, at level 0 and with
    ``resolution.from_checkpoint``, the pixel size the model was trained at
    (``spec.resolution``) is used where the image has one ("checkpoint"); where it has none,
    a warning says so and the image runs at level 0 as it is.
    """
    from tilenet.io.resolution import check_resolution

    check_resolution(resolution, level=cfg.level)
    if any(v is not None for v in (resolution.mpp, resolution.gsd, resolution.magnification)):
        return resolution, {"chosen_by": "requested"}
    trained = dict(spec.resolution or {})
    if not trained or cfg.level != 0 or not resolution.from_checkpoint:
        return None, {"chosen_by": "level", "level": cfg.level}
    if trained.get("mpp") is not None:
        if image.pixel_size is not None or resolution.assume_mpp is not None:
            return dataclasses.replace(resolution, mpp=float(trained["mpp"])), {
                "chosen_by": "checkpoint"
            }
        why = f"the model was trained at {trained['mpp']} µm/px but {image.path} has no pixel size"
    elif trained.get("gsd") is not None:
        units = trained.get("crs_units")
        here = None
        if image.transform is not None and image.crs:
            from tilenet.io.raster import describe_georef

            here = describe_georef(image.crs, None)["crs_units"]
        if image.transform is not None and (units is None or here is None or units == here):
            return dataclasses.replace(resolution, gsd=float(trained["gsd"])), {
                "chosen_by": "checkpoint"
            }
        why = (
            f"the model was trained at a GSD of {trained['gsd']} {units or 'CRS units'} but "
            f"{image.path} " + ("is in " + str(here) if image.transform else "has no geotransform")
        )
    else:
        return None, {"chosen_by": "level", "level": cfg.level}
    log.warning("%s; running at level 0 as it is (give --mpp/--gsd or --level)", why)
    return None, {"chosen_by": "level", "level": 0, "warning": why}


def _image_key(plan: ImagePlan) -> tuple[Any, ...]:
    """What identifies the image a band of ``plan`` runs on (for the per-image caches)."""
    return (plan.input, plan.outputs.key.fingerprint, str(plan.config.bands), str(plan.resolution))


def run_band(
    plan: ImagePlan,
    band: int,
    predictor: Predictor,
    image: Any,
    *,
    on_tiles: Callable[[int], None] | None = None,
    pace: Pace | None = None,
) -> dict[str, Any]:
    """Run band ``band`` of ``plan`` into its partial stores; record and return it as done.

    Crop mode runs the band in steps of whole grid rows sized by ``pace`` (about
    ``pace.budget_s`` of work each) and records each step when it is on disk, so a rerun
    after a kill goes on from the next row; blend modes record a resume point about as often
    (:mod:`tilenet.engine.blendsteps`). ``on_tiles(n)`` reports tiles done (first those kept
    from an earlier run, if any).
    """
    image = plan.view(image)
    pace = pace if pace is not None else Pace()
    if plan.config.mode == "crop":
        record = _run_rows(plan, band, predictor, image, on_tiles, pace)
    else:
        tiles = plan.tiles(band)
        record = run_blend(
            plan.outputs,
            band,
            plan.bands[band],
            plan.grid,
            predictor,
            image,
            tiles,
            strip_tiles=strip_tiles(plan.grid),
            skip=skip_mask(_image_key(plan), plan.config, image, tiles),
            stain=stain_for(_image_key(plan), plan.config, image, predictor.spec.stain),
            on_tiles=on_tiles,
            budget_s=pace.budget_s,
        )
    # Written only now, when every chunk of the band is on disk: the marker is the proof.
    plan.outputs.mark_band(band, record)
    return record


def _run_rows(
    plan: ImagePlan,
    band: int,
    predictor: Predictor,
    image: Any,
    on_tiles: Callable[[int], None] | None,
    pace: Pace,
) -> dict[str, Any]:
    """Crop mode: band ``band`` in steps of whole grid rows, each recorded when on disk."""
    r0, r1 = plan.bands[band]
    record = plan.outputs.band_progress(band, (r0, r1))
    row = r0
    if record is not None:  # rows kept from an earlier run
        row = record["done"]
        record |= {"tiles_kept": record["tiles"], "tiles_run_kept": record["tiles_run"]}
        if on_tiles is not None:
            on_tiles(record["tiles"])
    while row < r1:
        n = pace.rows(plan.grid.counts[1], r1 - row)
        tiles, sink = plan.tiles(band, rows=(row, row + n)), plan.outputs.sink()
        stats = predictor.run(
            image,
            tiles,
            STITCHERS["crop"](plan.grid, sink, plan.outputs.spill_dir()),
            grid=plan.grid,
            skip=skip_mask(_image_key(plan), plan.config, image, tiles),
            on_tiles=on_tiles,
            stain=stain_for(_image_key(plan), plan.config, image, predictor.spec.stain),
        )
        step = step_record(stats, sink, predictor)
        pace.add(step["tiles"], step["seconds"])
        row += n
        record = add_step(record, step) | {"rows": [r0, r1], "done": row}
        if row < r1:
            plan.outputs.mark_progress(band, record)
    assert record is not None
    return record


def finish(plan: ImagePlan, image: Any, *, setup_s: float | None = None) -> dict[str, Any]:
    """Finalize the outputs of a plan whose bands are all done; write and return the summary."""
    from tilenet._version import __version__

    image = plan.view(image)
    records = plan.outputs.band_records(plan.bands)
    cfg, spec = plan.config, plan.spec
    names = list(spec.class_names)
    t_fin = time.perf_counter()
    made = plan.outputs.finalize(image, cfg, downsample=plan.downsample)
    finalize_s = time.perf_counter() - t_fin
    n_inst, hist = made.instances, made.histogram
    area = [sum(int(r["area"][i]) for r in records) for i in range(spec.num_classes)]
    # From classes.tif where it was written: the input's nodata area left out.
    geo_area = [int(n) for n in hist[: spec.num_classes]] if hist is not None else area
    geo_nodata = int(hist[CLASSES_NODATA]) if hist is not None else 0
    nodata_px = sum(int(r.get("nodata_px", 0)) for r in records)
    n_tiles = sum(int(r["tiles"]) for r in records)
    n_run, n_kept = tiles_here(records, plan.outputs.resumed)
    tiles_s = sum(float(r["seconds"]) for r in records)
    # µm² only for a real pixel size (not one assumed with --assume-mpp).
    assumed = bool((plan.resolution_info or {}).get("pixel_size_assumed"))
    px_area = math.prod(plan.pixel_size) if plan.pixel_size and not assumed else None
    geo = _georef(image, plan.downsample)
    devices = sorted({str(r.get("device")) for r in records})
    summary: dict[str, Any] = {
        "tilenet_version": __version__,
        "input": redact(plan.input),
        "model": plan.model or spec.name,
        "model_name": spec.name,
        "shape": list(plan.grid.shape),
        "level": cfg.level,
        "resolution": plan.resolution_info,
        # The input bands run (1-based, the model's order; null: all) and where they came from.
        "bands": list(cfg.bands) if cfg.bands else None,
        "bands_from": plan.bands_from,
        "mode": cfg.mode,
        "exact": all(bool(r.get("exact")) for r in records),
        "tile": plan.grid.tile[0],  # as run (crop mode may shrink the requested tile)
        "halo": plan.halo,
        "stride": spec.stride,
        "receptive_field": spec.receptive_field,
        # tiles = tiles_run + tiles_skipped + tiles_resumed: run through the model by this
        # run, written as background by it (no foreground), kept from an interrupted run.
        "tiles": n_tiles,
        "tiles_run": n_run,
        "tiles_skipped": n_tiles - n_run - n_kept,
        "tiles_resumed": n_kept,
        "regions": len(records),
        "regions_resumed": len(plan.outputs.resumed),
        # Resume points: steps of grid rows recorded as they ended (tilenet.engine.pace).
        "steps": sum(int(r.get("steps", 1)) for r in records),
        "device": ",".join(devices),
        # As run (auto resolved per device), and which decoder ran and why (engine.decode).
        "precision": ",".join(sorted({str(r.get("precision", cfg.precision)) for r in records})),
        "decode": decode_summary(records),
        "class_names": names,
        "class_area_px": dict(zip(names, area, strict=True)),
        "class_area_um2": (
            {n: float(a * px_area) for n, a in zip(names, area, strict=True)} if px_area else None
        ),
        # Pixels without data in the input (nodata, alpha 0, a dataset mask), any input.
        "nodata_px": nodata_px,
        "nodata_area_um2": float(nodata_px * px_area) if px_area else None,
        **(
            {
                "crs": geo["crs"],
                "epsg": geo["epsg"],
                "crs_units": geo["crs_units"],
                "transform": geo["transform"],
                "class_area_crs2": {
                    n: float(a * geo["pixel_area"]) for n, a in zip(names, geo_area, strict=True)
                },
                "nodata_area_crs2": float(geo_nodata * geo["pixel_area"]),
            }
            if geo
            else {}
        ),
        # Connected regions per class (classes.geojson), when made.
        "class_regions": made.regions
        and {n: int(made.regions["count"].get(n, 0)) for n in names[1:]},
        "instances": n_inst
        and {
            "count": int(n_inst["count"]),
            "per_class": {
                names[int(c)]: int(n) for c, n in n_inst.get("per_class_counts", {}).items()
            },
        },
        "timings": timings(
            records, t0=plan.t0, setup_s=setup_s, finalize_s=finalize_s, cog_s=made.cog_s
        ),
        "tiles_per_s": round(n_tiles / max(tiles_s, 1e-9), 3),
        "outputs": dict(made.outputs),
    }
    # The pixel size it ran at, stated (chosen from the checkpoint, say): a rerun from this
    # config.yaml runs at it again.
    resolution = plan.resolution or ResolutionConfig(from_checkpoint=False)
    return plan.outputs.publish(summary, cfg, {"reader": plan.reader, "resolution": resolution})


def _georef(image: Any, downsample: tuple[float, float]) -> dict[str, Any] | None:
    """The CRS, the transform of the level run (GDAL order) and a pixel's area in CRS units²."""
    transform = getattr(image, "transform", None)
    if transform is None:
        return None
    from tilenet.io.crs import describe_georef

    t = GeoTransform(*transform).scaled(downsample)
    info = describe_georef(image.crs, t)
    return {
        "crs": image.crs,
        "epsg": info["epsg"],
        "crs_units": info["crs_units"],
        "transform": list(t),
        "pixel_area": t.pixel_area,
    }


# -- one image, in this process ---------------------------------------------------------------
@exclusive_output("out_dir", what="tilenet infer")
def infer_image(
    input: Any,
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = False,
    region_tiles: int = REGION_TILES,
    reader: ReaderConfig | None = None,
    resolution: ResolutionConfig | None = None,
    config: InferConfig | None = None,
    checkpoint_s: float = CHECKPOINT_S,
    **options: Any,
) -> dict[str, Any]:
    """Run tiled inference of ``model`` on ``input`` and write the outputs to ``out_dir``.

    ``input`` is a path (or an open :class:`~tilenet.io.base.LazyImage`); ``model`` a
    checkpoint path, a ``(module, spec)`` pair or a :class:`~tilenet.engine.predictor.Predictor`;
    ``config`` the typed :class:`InferConfig` (the defaults when None), used as it is;
    ``options`` are :class:`InferConfig` fields, merged onto it (:func:`resolve_options`).
    Crop-mode images are run in bands of about ``region_tiles`` tiles, each in steps of about
    ``checkpoint_s`` seconds of work (:mod:`tilenet.engine.pace`); blend modes record a
    resume point as often (:mod:`tilenet.engine.blendsteps`); when a run over a checkpoint
    is interrupted, the same call again keeps the finished bands, steps and resume points.
    ``reader`` sets the input's reader limits, ``resolution`` the pixel size to run at
    (:func:`plan_image`). Returns the summary also written to ``out_dir/summary.json``.
    """
    t_start = time.perf_counter()
    cfg = resolve_options(options, config=config)
    reader = reader if reader is not None else ReaderConfig()
    if isinstance(input, str | os.PathLike):
        from tilenet.io import open_image

        image = open_image(input, **asdict(reader))
    else:
        image = input
    try:
        predictor = model.with_config(cfg) if isinstance(model, Predictor) else None
        predictor = predictor or Predictor(model, cfg)
        plan = plan_image(
            image,
            predictor.spec,
            cfg,
            out_dir,
            model=predictor.checkpoint,
            region_tiles=region_tiles,
            reader=reader,
            resolution=resolution,
        )
        setup_s = time.perf_counter() - t_start

        resumed = sum(len(plan.tiles(i)) for i in plan.outputs.resumed)
        try:
            with progress_bar(
                len(plan.grid), desc="infer", unit="tile", enabled=progress, initial=resumed
            ) as bar:
                pace = Pace(checkpoint_s)
                for band in plan.pending:
                    run_band(plan, band, predictor, image, on_tiles=bar.update, pace=pace)
            if plan.outputs.resumed:
                log.info("%s: kept %d finished bands", image.path, len(plan.outputs.resumed))
            return finish(plan, image, setup_s=setup_s)
        except BaseException:
            plan.outputs.abandon()  # nothing half-written left; recorded work kept
            raise
    finally:
        if image is not input:
            image.close()
