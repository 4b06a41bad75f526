"""Typed configuration: one dataclass per pipeline stage, loaded with omegaconf.

``load_config("conf/x.yaml", ["train.lr=1e-3"])`` merges, in order, the structured defaults,
the YAML file and the dotlist overrides. Every key is checked against the dataclasses: an
unknown key is a :class:`~tilenet.errors.ConfigError` that names the key and lists the valid
ones; a value of the wrong type or outside a ``Literal`` is one too. Values are never evaluated.

A component receives its own section (``cfg.train``, ``cfg.infer``), never the whole tree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tilenet.errors import ConfigError, one_line

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "AugmentConfig",
    "Config",
    "DataConfig",
    "InferConfig",
    "JobsConfig",
    "ModelConfig",
    "ReaderConfig",
    "ResolutionConfig",
    "TilingConfig",
    "TrainConfig",
    "load_config",
    "merge_options",
    "replace_typed",
    "save_config",
    "split_config_args",
    "to_yaml",
]

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ReaderConfig:
    """How images are opened: the keyword limits of :func:`tilenet.io.open_image`."""

    #: Largest PNG/JPEG (pixels) read whole; above it, run ``tilenet convert`` first.
    max_pixels_eager: int = 200_000_000
    #: Largest level-0 size (pixels) accepted from any header; guards against crafted files.
    max_pixels: int = 10**12


@dataclass
class ResolutionConfig:
    """The pixel size to work at (tiling, training from images, inference); see
    :mod:`tilenet.io.resolution`. At most one of ``mpp``, ``gsd``, ``magnification``: the
    finest pyramid level at or finer than it is read and resampled by the rest, per window."""

    #: Microns per pixel (slides), e.g. 0.5.
    mpp: float | None = None
    #: Ground sample distance in the CRS's units per pixel (georeferenced rasters), e.g. 10.
    gsd: float | None = None
    #: Objective magnification (slides stating their objective power), e.g. 20.
    magnification: float | None = None
    #: The pixel size (µm) to assume for an image whose file states none.
    assume_mpp: float | None = None
    #: A level whose pixel size is within this relative tolerance of the target is used as is.
    tolerance: float = 0.05
    #: The largest upsampling allowed (target finer than level 0 by this factor); beyond it
    #: the plan is refused in one line, before anything is written.
    max_upsample: float = 2.0
    #: Inference without a target (and at level 0): run at the pixel size the checkpoint was
    #: trained at, when the image has one.
    from_checkpoint: bool = True


@dataclass
class TilingConfig:
    """``tilenet tile``: the keyword options of :func:`tilenet.patches.tiler.tile_images`."""

    patch: int = 256
    overlap: int = 32
    level: int = 0
    min_foreground: float = 0.0
    #: Pyramid level (or thumbnail side) used for the foreground mask.
    mask_max_side: int = 2048
    #: Keep only patches with at least this fraction on tissue (tilenet.tissue: saturation,
    #: Otsu, pen marks out, on a thumbnail at 8 µm/px); 0: off.
    tissue: float = 0.0
    workers: int = 2
    #: Patches per zarr chunk along N (one chunk = one contiguous training read).
    chunk_patches: int = 64
    #: Vector labels instead of label images (tilenet.io.vector): QuPath GeoJSON exports in
    #: level-0 pixels (a file, a directory or a pattern; matched to images by name) ...
    annotations: str | None = None
    #: ... or one vector file (GeoPackage, Shapefile, GeoJSON, FlatGeobuf) in any CRS for
    #: every raster, reprojected to each.
    vector_labels: str | None = None
    #: The property / field holding the class name (QuPath: classification.name by default).
    label_field: str | None = None
    #: Pixels outside every polygon: "ignore" (255, skipped by the loss) or "background" (0).
    outside: Literal["ignore", "background"] = "ignore"
    #: Keep only patches with at least this fraction of pixels inside a polygon.
    min_annotated: float = 0.0
    #: Class name -> label index; default: the names in the files, sorted.
    class_map: dict[str, int] = field(default_factory=dict)
    #: Bands to keep, 1-based and in the model's order (e.g. [4, 3, 2]); all when null.
    bands: list[int] | None = None


@dataclass
class AugmentConfig:
    """Joint image+mask augmentation (torchvision.transforms.v2)."""

    #: Master switch (validation never augments).
    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.05
    hue: float = 0.0
    #: Random rescale range; (1.0, 1.0) disables it.
    scale: tuple[float, float] = (1.0, 1.0)
    #: HED stain augmentation for H&E (Tellez et al. 2018): each stain scaled by
    #: U(1 - hed, 1 + hed) and shifted by U(-hed_bias, hed_bias) per patch (null: hed);
    #: e.g. 0.05 light, 0.2 strong. 0: off. RGB images only.
    hed: float = 0.0
    hed_bias: float | None = None


@dataclass
class DataConfig:
    """Training data: patch stores, or images + labels sampled on the fly."""

    #: One or more patch stores written by ``tilenet tile``.
    stores: list[str] = field(default_factory=list)
    #: Alternative to stores: image and label directories read lazily.
    images: str | None = None
    labels: str | None = None
    #: Alternative to labels: vector labels sampled inside annotated regions (see tiling.*).
    annotations: str | None = None
    vector_labels: str | None = None
    label_field: str | None = None
    outside: Literal["ignore", "background"] = "ignore"
    class_map: dict[str, int] = field(default_factory=dict)
    #: Held-out patch store(s) for validation.
    val_stores: list[str] = field(default_factory=list)
    patch: int = 256
    batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 1024
    #: Crops per epoch when sampling from images directly.
    samples_per_epoch: int = 1024
    #: data.images: bands to read, 1-based and in the model's order; all when null.
    bands: list[int] | None = None
    #: Oversample patches containing rare classes.
    class_balance: bool = False
    normalize: bool = True
    #: "float": normalised float32 batches from the loader; "uint8": raw batches, normalised
    #: on the device with tilenet.patches.data.normalize_batch (4x less to move between processes).
    output: Literal["float", "uint8"] = "float"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: An RGB reference image (or region) every patch's stain is normalised to before
    #: augmentation (tilenet.stain; uint8 RGB data); null: off. Inference: --stain.
    stain: str | None = None
    stain_method: Literal["macenko", "reinhard"] = "macenko"
    class_names: list[str] = field(default_factory=list)
    #: Generate the synthetic dataset here first when it is missing (demo configs).
    synth_dir: str | None = None
    synth_size: int = 1024
    synth_count: int = 4
    seed: int = 0


@dataclass
class ModelConfig:
    """Which registered model to build, and its options."""

    name: str = "unet"
    in_channels: int = 3
    num_classes: int = 3
    #: Extra keyword arguments for the model constructor (plain data only).
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Optional local weights file (never downloaded).
    weights: str | None = None
    #: Optional local state dict of the model's encoder (smp.* models; e.g. ImageNet weights
    #: saved from timm or torchvision), loaded before ``weights``; or, with allow_download,
    #: the name of published weights.
    encoder_weights: str | None = None
    #: Let ``encoder_weights`` name published weights (``imagenet``, ``hf-hub:ORG/REPO``),
    #: fetched by smp/timm from the Hugging Face hub (network, or HF_HOME's cache).
    allow_download: bool = False
    #: Input normalisation stored in the checkpoint and used in training and inference:
    #: "data": the training data's per-channel mean/std (data.normalize); "encoder": the
    #: statistics the (smp.*) encoder was pretrained with, scaled by pixel_max.
    normalization: Literal["data", "encoder"] = "data"
    #: The raw pixel value that is 1.0 in the encoder's [0, 1] range (normalization=encoder):
    #: 255 for 8-bit images, e.g. 65535 for 16-bit ones.
    pixel_max: float = 255.0


@dataclass
class TrainConfig:
    """``python -m tilenet.train``."""

    out_dir: str | None = None
    device: str = "auto"
    precision: Precision = "fp32"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_steps: int = 50
    #: Learning rate of the model's encoder (smp.* models), under the same schedule;
    #: null: train.lr.
    encoder_lr: float | None = None
    #: Keep the encoder fixed for the first N steps (smp.* models): it computes no gradients
    #: (requires_grad off: no backward memory), its learning rate is 0 and its BatchNorm
    #: layers stay in eval mode (running statistics unchanged).
    freeze_encoder_steps: int = 0
    loss: Literal["ce", "dice", "ce+dice"] = "ce+dice"
    class_weights: list[float] = field(default_factory=list)
    #: A label the loss and the metrics skip. 255 ("no label": outside every annotation,
    #: nodata, augmentation's fill) is skipped whatever this is; set it to, say, 0 where
    #: class 0 of your label images means "unlabelled".
    ignore_index: int = 255
    val_every: int = 100
    val_images: list[str] = field(default_factory=list)
    val_labels: list[str] = field(default_factory=list)
    #: Also score val_images (tiled inference) every this many steps; 0: only at the end.
    val_images_every: int = 0
    best_metric: str = "val_dice"
    early_stop_patience: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    #: ``true`` resumes from ``out_dir/last.pt``; a path resumes from that checkpoint.
    resume: Any = False
    #: Stop after this many steps (used to simulate an interrupted run in tests).
    max_steps_this_run: int | None = None
    progress: bool = True


@dataclass
class InferConfig:
    """``tilenet infer``."""

    tile: int = 1024
    mode: Literal["crop", "gaussian", "linear"] = "crop"
    overlap: float = 0.25
    #: Crop-mode halo override in pixels; by default the model's receptive field.
    halo: int | None = None
    level: int = 0
    #: Input bands for the model, 1-based and in the model's order (e.g. [4, 3, 2]); all when
    #: None.
    bands: list[int] | None = None
    batch: int = 4
    device: str = "auto"
    #: "auto": bf16 autocast on a GPU that supports it, fp16 on other GPUs, fp32 on the CPU
    #: (crop mode is exact only in fp32).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: Where JPEG tiles are decoded. "auto": on the model's GPU (nvJPEG, one batched call per
    #: batch) for 8-bit JPEG tiles, else by the reader in reader threads; "cpu": the reader
    #: always; "gpu": the device decoder (an error off CUDA; other codecs are still read).
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    tta: bool = False
    #: Run the model through torch.compile (compiled at the first batch; off: eager).
    compile: bool = False
    #: Any of probabilities, classes, instances, preview, geojson (instances.geojson and the
    #: class regions classes.geojson), regions (classes.geojson alone, no instances) and
    #: probabilities_tif (a COG; needs no "probabilities").
    outputs: list[str] = field(
        default_factory=lambda: ["probabilities", "classes", "instances", "preview"]
    )
    #: Georeferenced inputs: the CRS of instances.geojson and classes.geojson: the input's
    #: ("input", its name recorded) or longitude/latitude per RFC 7946 ("wgs84"). The .gpkg
    #: files are always in the input's CRS; other inputs get QuPath GeoJSON in level-0 pixels.
    geojson_crs: Literal["input", "wgs84"] = "input"
    #: float32 keeps the exact probabilities (for checks); float16/uint8 save space.
    probabilities_dtype: Literal["float16", "uint8", "float32"] = "float16"
    min_foreground: float = 0.0
    #: Skip tiles whose tissue fraction (tilenet.tissue's mask) is below this (written as
    #: class 0); 0: off.
    tissue: float = 0.0
    #: An RGB reference image (or region) to normalise the stain to (tilenet.stain): fitted
    #: once; each input's stains are estimated once, on its tissue; null: the normaliser the
    #: model stores (trained with data.stain), else off; "none": off.
    stain: str | None = None
    stain_method: Literal["macenko", "reinhard"] = "macenko"
    readers: int = 2
    chunk: int = 1024
    #: Host memory policy while the engine runs (glibc; restored after the run, see
    #: tilenet.runtime). "reuse": freed buffers are kept for the next batch and trimmed every
    #: 8 batches (fast on a CPU; peak RSS saturates a few per cent above its level on
    #: mid-size images, and the run goes flat if the RSS passes the RSS before the first
    #: batch plus twice what that batch added). "flat": every buffer above 128 KiB is its
    #: own mapping, returned when freed (peak RSS flat to ~0.3 % from 8192² to 32768², CPU
    #: forward passes 1.2-1.8x slower). "trim": glibc's settings plus the periodic trim;
    #: "system": nothing changed.
    heap: Literal["reuse", "flat", "trim", "system"] = "reuse"
    #: Refuse a local output whose stores (uncompressed, with pyramids) exceed the free
    #: space of its disk (``--no-disk-check``: write anyway; tilenet.engine.plan.check_disk).
    disk_check: bool = True


@dataclass
class JobsConfig:
    """Batch jobs and distributed execution (``tilenet infer`` of several images, ``tile``)."""

    #: Dask LocalCluster worker processes for a batch; 0 runs in this process.
    workers: int = 0
    #: Address of an existing dask scheduler to submit the batch to.
    scheduler: str | None = None
    retry_failed: bool = False
    #: Redo every image of a batch, done or not.
    force: bool = False
    #: No progress bar.
    quiet: bool = False
    #: One JSON object per event on stderr.
    log_json: bool = False
    #: Crop mode: images with more tiles run as row bands of about this many tiles.
    region_tiles: int = 256
    #: torch intra-op threads per process; None: all cores serially, cores/N per worker.
    threads: int | None = None
    #: Another run writing the same output: wait for it to end instead of refusing.
    wait: bool = False


@dataclass
class Config:
    """The whole tree. Components receive their own section."""

    reader: ReaderConfig = field(default_factory=ReaderConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)


#: A dotted override: ``section.key=value`` (a path such as ``a=b.tif`` is not one).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def split_config_args(items: Iterable[str]) -> tuple[str | None, list[str], list[str]]:
    """Split command-line items into ``conf=FILE``, dotted ``key=value`` overrides and the rest.

    An override names a section and a key (``infer.tile=512``); every other item (an image
    path, say) is returned in order as the rest. ``conf=`` may be given once.

    >>> split_config_args(["a.tif", "conf=x.yaml", "infer.tile=512", "b=c.tif"])
    ('x.yaml', ['infer.tile=512'], ['a.tif', 'b=c.tif'])
    """
    conf: str | None = None
    overrides: list[str] = []
    rest: list[str] = []
    for item in items:
        if item.startswith("conf="):
            if conf is not None:
                raise ConfigError(f"give conf=FILE at most once (got {conf!r} and {item[5:]!r})")
            conf = item[len("conf=") :]
        elif _OVERRIDE.match(item):
            overrides.append(item)
        else:
            rest.append(item)
    return conf, overrides, rest


def _valid_keys(key_path: str) -> list[str]:
    """The valid keys at the dotted ``key_path`` of the schema (its parent section)."""
    cls: Any = Config
    for part in key_path.split(".")[:-1]:
        hit = next((f for f in fields(cls) if f.name == part), None)
        factory: Any = None if hit is None else hit.default_factory
        if not (callable(factory) and is_dataclass(factory)):
            break
        cls = factory
    return sorted(f.name for f in fields(cls))


def _config_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    from omegaconf.errors import ConfigKeyError

    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        valid = ", ".join(_valid_keys(str(key)))
        return ConfigError(f"{source}: unknown config key {key!r}; valid keys here: {valid}")
    msg = one_line(exc, typed=False)
    return ConfigError(f"{source}: invalid value for {key!r}: {msg}")


def load_config(
    conf: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> DictConfig:
    """Load defaults, then the YAML file ``conf``, then dotlist ``overrides`` (``a.b=c``).

    An override of ``model.name`` to another model drops the file's ``model.kwargs`` (they
    are options of the model the file named); ``model.kwargs.*`` overrides still apply.

    Returns a structured :class:`omegaconf.DictConfig` (typed, read-only keys).

    >>> cfg = load_config(None, ["train.lr=0.01"])
    >>> cfg.train.lr, cfg.model.name
    (0.01, 'unet')
    """
    # omegaconf is imported here, not at the top: the readers and the CLI import the
    # dataclasses (their defaults) and should not pay for it.
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException, ValidationError

    cfg = OmegaConf.structured(Config)
    if conf is not None:
        path = Path(conf)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml errors come in many types
            first = one_line(exc, typed=False)
            raise ConfigError(f"{path}: not a valid YAML config: {first}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, str(path)) from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like key=value (e.g. train.lr=1e-3)")
    if overrides:
        try:
            extra = OmegaConf.from_dotlist(list(overrides))
            model = extra.get("model")
            if isinstance(model, DictConfig) and "name" in model and model.name != cfg.model.name:
                # Another model: the file's kwargs were options of the one it named.
                cfg.model.kwargs = {}
            cfg = OmegaConf.merge(cfg, extra)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, "command line") from None
    try:
        OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, ValidationError) as exc:
        raise _config_error(exc, str(conf or "command line")) from None
    assert isinstance(cfg, DictConfig)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    plain = _plain(cfg)
    if plain is not None:  # typed dataclasses (in a dict): OmegaConf's own dump, without the
        import yaml  # ~50 ms of building a structured config first
        from omegaconf._utils import get_omega_conf_dumper

        return yaml.dump(
            plain,
            default_flow_style=False,
            allow_unicode=True,
            sort_keys=False,
            Dumper=get_omega_conf_dumper(),
        )
    from omegaconf import OmegaConf

    if is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: Any, directory: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Save the resolved config beside an output (atomically) and return its path."""
    from tilenet.fsutil import write_text_atomic

    return write_text_atomic(Path(directory) / name, to_yaml(cfg))


def merge_options(cls: type, config: Any | None, options: dict[str, Any]) -> Any:
    """``config`` (``cls``'s defaults when None) with ``options`` merged, checked and coerced
    by OmegaConf as a structured config (:func:`replace_typed` where nothing needs it); an
    invalid value raises OmegaConf's error."""
    fast = replace_typed(config if config is not None else cls(), options)
    if fast is not None:
        return fast
    from omegaconf import OmegaConf

    base = OmegaConf.structured(config if config is not None else cls)
    return OmegaConf.to_object(OmegaConf.merge(base, options))


def replace_typed(cfg: Any, options: dict[str, Any]) -> Any | None:
    """``dataclasses.replace(cfg, **options)`` where every field of the result already holds a
    value of its declared type as OmegaConf would store it (an int given for a float field
    becomes a float, a tuple for a list field a list); None where a value needs OmegaConf's
    checking or coercion (a string for a number, an unknown choice, ...).

    The fast path of validating keyword options: OmegaConf's structured merge costs tens of
    milliseconds per call, paid by every image of a batch job.

    >>> replace_typed(InferConfig(), {"tile": 256, "overlap": 0}).overlap
    0.0
    >>> replace_typed(InferConfig(), {"tile": "256"}) is None
    True
    """
    import dataclasses

    hints = _hints(type(cfg))
    values = {**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **options}
    clean: dict[str, Any] = {}
    for name, value in values.items():
        ok, value = _as_type(value, hints[name])
        if not ok:
            return None
        clean[name] = value
    return dataclasses.replace(cfg, **clean)


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        import typing

        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _as_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(True, value as OmegaConf stores it)`` where ``value`` is exactly of type ``tp``."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if tp in (bool, int, str):
        return type(value) is tp, value
    if tp is float:
        ok = type(value) in (int, float)
        return ok, float(value) if ok else value
    if origin is Literal:
        return type(value) is str and value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return type(None) in args, None
        arms = [a for a in args if a is not type(None)]
        return _as_type(value, arms[0]) if len(arms) == 1 else (False, None)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False, None
        items = [_as_type(v, item) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return False, None


def _plain(cfg: Any) -> Any | None:
    """A dataclass whose every field holds a value of its type (:func:`replace_typed`), or a
    dict of them, as the plain data OmegaConf would dump; None for anything else."""
    import dataclasses

    if isinstance(cfg, dict):
        out = {k: _plain(v) for k, v in cfg.items()}
        ok = all(isinstance(k, str) for k in out) and None not in out.values()
        return out if ok else None
    if is_dataclass(cfg) and not isinstance(cfg, type):
        typed = replace_typed(cfg, {})
        return None if typed is None else dataclasses.asdict(typed)
    return None
