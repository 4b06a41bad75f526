"""Patch embeddings of one image: read by microns per pixel, encode, stream to a feature file.

:func:`embed_image` cuts the image, at the pixel size asked for (``--mpp``, default the
encoder's; :mod:`tilenet.io.resolution`), into a grid of ``patch`` x ``patch`` windows
stepping ``patch - overlap`` (whole patches only; the < step pixels at the right and bottom
edge are left out), keeps those ``keep`` accepts, and runs them in batches through the
encoder. Reading is the engine's: whole batches are read ahead, each by one reader thread
(:func:`tilenet.engine.pipeline.prefetch`), so decoding overlaps the model; where the pixel
size is a pyramid level as it is (within the tolerance), a batch fetches the stored JPEG
tiles only and the ``cpu`` decoder (:mod:`tilenet.engine.decode`) decodes each tile the
batch touches once. On the device a uint8 (B, 3, P, P) batch goes through ``transform``
(e.g. stain normalisation), is resized and centre-cropped to the encoder's input as its spec
says, scaled and normalised, encoded under the encoder's precision (autocast on a GPU; fp32
on a CPU unless asked), and its rows go to one writer thread (:mod:`tilenet.outputs.embeddings`).

Resume: every ``checkpoint_every`` batches the rows written are flushed and marked; a rerun
with the same key (input fingerprint, encoder, weights, options) continues after the
marker, so a killed run ends with the file an uninterrupted run writes (batches are cut
the same way, so even oneDNN's batch-size dependent rounding is the same). A finished file
with the same key is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from tilenet.config import ReaderConfig, ResolutionConfig
from tilenet.engine.decode import DECODERS
from tilenet.engine.pipeline import BackgroundWriter, prefetch
from tilenet.engine.predictor import prepare_model
from tilenet.engine.weights import LoadedEncoder, load_encoder
from tilenet.errors import ConfigError, InputError
from tilenet.geometry import Window, spans
from tilenet.io.base import LazyImage
from tilenet.io.resolution import Resolution, at_resolution
from tilenet.io.source import EncodedWindow, decode_window
from tilenet.models.encoders import EncoderSpec
from tilenet.normalize import Normalizer
from tilenet.outputs.embeddings import FEATURE_WRITERS, finished_key
from tilenet.progress import progress_bar
from tilenet.runtime import autocast, resolve_device

if TYPE_CHECKING:
    import torch

__all__ = [
    "EmbedConfig",
    "EmbedPlan",
    "EmbedResult",
    "Keep",
    "Transform",
    "embed_image",
    "encoder_input",
    "plan_patches",
    "stain_transform",
    "tissue_filter",
]

log = logging.getLogger(__name__)

#: A patch filter: the patch's window in level-0 pixels -> embed it or not.
Keep = Callable[[Window], bool]
#: A batch transform on the device: uint8 (B, 3, P, P) -> uint8 (B, 3, P, P).
Transform = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class EmbedConfig:
    """Options of ``tilenet embed`` for one image (the resolution comes separately)."""

    #: Patch side in pixels at the target pixel size (None: the encoder's recommendation).
    patch: int | None = None
    #: Pixels shared by neighbouring patches (step = patch - overlap).
    overlap: int = 0
    batch: int = 64
    readers: int = 4
    device: str = "auto"
    #: fp32, fp16 or bf16; None: the encoder's recommendation on a GPU, fp32 on a CPU.
    precision: str | None = None
    #: Feature file format (:data:`tilenet.outputs.embeddings.FEATURE_WRITERS`).
    format: str = "h5"
    #: Batches between resume markers.
    checkpoint_every: int = 8
    #: Decode stored JPEG tiles per batch (``cpu`` decoder) where the level is read as is.
    decode: bool = True


@dataclass
class EmbedResult:
    """What one :func:`embed_image` did."""

    path: str
    patches: int
    dim: int
    skipped: bool = False
    rows_resumed: int = 0
    seconds: float = 0.0
    model_s: float = 0.0
    read_wait_s: float = 0.0

    @property
    def patches_per_s(self) -> float:
        return (self.patches - self.rows_resumed) / self.seconds if self.seconds else 0.0


@dataclass
class EmbedPlan:
    """Where the patches are: the image read, its level, the windows there, and each
    window's level-0 top-left corner (x, y)."""

    image: LazyImage
    level: int
    resolution: Resolution | None
    patch: int
    windows: list[Window]
    coords: np.ndarray
    #: Size (y, x) of a read pixel in level-0 pixels.
    scale: tuple[float, float]


def _target(image: LazyImage, res: ResolutionConfig | None, spec: EncoderSpec) -> Any:
    """The resolution to read at: what was asked, else the encoder's mpp where the image
    has a pixel size (or one is assumed), else the file's own pixels."""
    res = res or ResolutionConfig()
    if res.mpp is None and res.gsd is None and res.magnification is None:
        if image.pixel_size is None and res.assume_mpp is None:
            log.warning("%s: no pixel size; embedding its level-0 pixels as they are", image.path)
            return res
        return ResolutionConfig(**{**asdict(res), "mpp": spec.mpp})
    return res


def plan_patches(
    image: LazyImage,
    spec: EncoderSpec,
    *,
    patch: int | None = None,
    overlap: int = 0,
    resolution: ResolutionConfig | None = None,
    keep: Keep | None = None,
) -> EmbedPlan:
    """The patch grid of ``image`` at the target pixel size, filtered by ``keep``."""
    p = int(patch or spec.patch)
    if p <= 0 or not 0 <= overlap < p:
        raise ConfigError(f"need patch > 0 and 0 <= overlap < patch, got {p} and {overlap}")
    view, res = at_resolution(image, _target(image, resolution, spec))
    if res is None or res.used_as_is:  # read the level itself: its stored tiles are the patch's
        read, level = image, (res.source_level if res else 0)
        scale = image.levels[level].downsample
    else:
        read, level, scale = view, 0, (res.scale[0], res.scale[1])
    h, w = read.levels[level].shape
    step = p - overlap
    windows, coords = [], []
    for y in range(0, h - p + 1, step):
        for x in range(0, w - p + 1, step):
            x0, y0 = round(x * scale[1]), round(y * scale[0])
            lvl0 = Window(y0, x0, round(p * scale[0]), round(p * scale[1]))
            if keep is None or keep(lvl0):
                windows.append(Window(y, x, p, p))
                coords.append((x0, y0))
    arr = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return EmbedPlan(read, level, res, p, windows, arr, (float(scale[0]), float(scale[1])))


def encoder_input(spec: EncoderSpec, device: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B, 3, P, P) -> the encoder's float32 input: resize, centre crop, normalise.

    On the CPU a bilinear or bicubic resize runs on the uint8 pixels (torch's antialiased
    uint8 kernels, written to match Pillow's, which the models' own eval transforms use:
    within 1 grey level of ``PIL.Image.resize``, and ~6x faster than on floats, whose
    bicubic differs from Pillow's by up to ~19 levels on noisy tiles); elsewhere, and for
    other modes, on float32.
    """
    import torch
    import torch.nn.functional as F

    norm = Normalizer([m * 255 for m in spec.mean], [s * 255 for s in spec.std], device=device)
    size, resize = spec.input_size, spec.resize
    target = resize if resize is not None else size
    uint8_ok = spec.interpolation in ("bilinear", "bicubic")

    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != target or x.shape[-2] != target:
            if not (uint8_ok and x.dtype == torch.uint8 and x.device.type == "cpu"):
                x = x.float()
            x = F.interpolate(
                x.contiguous(memory_format=torch.channels_last), size=(target, target),
                mode=spec.interpolation, antialias=True, align_corners=False,
            )  # fmt: skip
            if x.is_floating_point():
                x = x.clamp_(0, 255)
        top = (x.shape[-2] - size) // 2
        left = (x.shape[-1] - size) // 2
        if top or left:
            x = x[:, :, top : top + size, left : left + size]
        return norm(x.float().contiguous(memory_format=torch.channels_last))

    return prepare


def _rgb(a: np.ndarray, path: Any) -> np.ndarray:
    if a.dtype != np.uint8:
        raise InputError(f"{path}: encoders take 8-bit RGB; this image is {a.dtype}")
    c = a.shape[-1]
    if c == 3:
        return a
    if c == 1:
        return np.repeat(a, 3, axis=-1)
    if c == 4:
        return a[..., :3]
    raise InputError(f"{path}: encoders take RGB; this image has {c} bands (pick 3 with --bands)")


def run_key(parts: dict[str, Any]) -> str:
    """The hex SHA-256 of a run's identity (plain data)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _level0_mag(image: LazyImage) -> float | None:
    if image.objective_power:
        return float(image.objective_power)
    if image.pixel_size:  # 10x is 1 µm/px by the usual convention
        return round(10.0 / min(image.pixel_size), 2)
    return None


def _attrs(
    image: LazyImage,
    plan: EmbedPlan,
    spec: EncoderSpec,
    loaded: LoadedEncoder,
    cfg: EmbedConfig,
    precision: str,
    stem: str,
    out: Path,
    extra: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The coords/features/root attributes: TRIDENT's names first, then tilenet's."""
    h0, w0 = image.levels[0].shape
    mag0 = _level0_mag(image)
    sy, sx = plan.scale
    target_mag = None if mag0 is None else round(mag0 / sx, 4)
    mpp0 = list(image.pixel_size) if image.pixel_size else None
    mpp = [mpp0[0] * sy, mpp0[1] * sx] if mpp0 else None
    coords = {
        "patch_size": plan.patch,
        "patch_size_level0": round(plan.patch * sx),
        "level0_magnification": mag0,
        "target_magnification": target_mag,
        "overlap": cfg.overlap,
        "level0_width": w0,
        "level0_height": h0,
        "name": stem,
        "savetodir": str(out),
        # what TRIDENT lacks
        "mpp": None if mpp is None else float(np.mean(mpp)),
        "mpp_xy": mpp,
        "mpp_level0": mpp0,
        "scale_level0": [sx, sy],
        "coords_frame": "level-0 pixels, top-left corner (x, y)",
        "crs": image.crs,
        "transform": list(image.pixel_transform(0).to_gdal()) if image.transform else None,
        **extra,
    }
    features = {
        "name": stem,
        "savetodir": str(out),
        "encoder": spec.name,
        "pooling": spec.pooling,
        "precision": precision,
        "weights": loaded.source,
        "weights_sha256": loaded.sha256,
    }
    root = {
        "tilenet": {
            "encoder": spec.to_dict(),
            "weights": loaded.source,
            "weights_sha256": loaded.sha256,
            "resolution": plan.resolution.to_dict() if plan.resolution else None,
            "config": asdict(cfg),
            "precision": precision,
            "extra": extra,
        }
    }
    return {"coords": coords, "features": features, "root": root}


def embed_image(
    input: str | Path,
    encoder: str | LoadedEncoder,
    out: str | Path,
    *,
    config: EmbedConfig | None = None,
    weights: str | Path | None = None,
    resolution: ResolutionConfig | None = None,
    reader: ReaderConfig | None = None,
    keep: Keep | None = None,
    keep_for: Callable[[LazyImage], Keep | None] | None = None,
    transform: Transform | None = None,
    transform_for: Callable[[LazyImage], Transform | None] | None = None,
    extra_attrs: dict[str, Any] | None = None,
    stem: str | None = None,
    force: bool = False,
    wait: bool = False,
    progress: bool = False,
) -> EmbedResult:
    """Embed every kept patch of ``input`` into ``out/features/<stem>.h5`` (or ``.zarr``).

    ``encoder``: a preset name, ``timm:<name>``, or a :class:`LoadedEncoder` (its module is
    prepared in place: eval, BatchNorm folded, on the device). ``keep``: a patch filter on
    level-0 windows (tissue), or ``keep_for(image)`` making one from the opened image (a
    batch: one per slide); ``transform``: a uint8 batch transform on the device (stain
    normalisation), or ``transform_for(image)`` making one per slide; describe both in ``extra_attrs`` (recorded, and part of the resume key).
    A finished file of the same run is skipped unless ``force``. The run holds the file
    (:func:`tilenet.io.lock.hold_output`, beside it): another run on it refuses (or, with ``wait``, waits).
    """
    from tilenet.fsutil import safe_stem
    from tilenet.io import open_image
    from tilenet.io.lock import hold_output
    from tilenet.io.sniff import fingerprint

    cfg = config or EmbedConfig()
    if cfg.format not in FEATURE_WRITERS:
        raise ConfigError(f"format {cfg.format!r} is not one of {', '.join(FEATURE_WRITERS)}")
    if cfg.batch < 1 or cfg.checkpoint_every < 1:
        raise ConfigError("batch and checkpoint_every must be >= 1")
    loaded = encoder if isinstance(encoder, LoadedEncoder) else load_encoder(encoder, weights)
    spec = loaded.encoder.spec
    extra = dict(extra_attrs or {})
    t0 = time.perf_counter()
    image = open_image(input, **asdict(reader or ReaderConfig()))
    try:
        if keep_for is not None:
            keep = keep_for(image)
        if transform_for is not None:
            transform = transform_for(image)
        plan = plan_patches(
            image, spec, patch=cfg.patch, overlap=cfg.overlap, resolution=resolution, keep=keep
        )
        stem = stem or safe_stem(Path(str(input)).name)
        writer_cls = FEATURE_WRITERS[cfg.format]
        final = Path(out) / "features" / f"{stem}{writer_cls.suffix}"
        device = resolve_device(cfg.device)
        precision = cfg.precision or (spec.precision if device.type == "cuda" else "fp32")
        attrs = _attrs(image, plan, spec, loaded, cfg, precision, stem, Path(out), extra)
        identity = {
            "input": fingerprint(input),
            "encoder": spec.to_dict(),
            "weights": loaded.sha256,
            "config": {**asdict(cfg), "readers": None, "checkpoint_every": None},
            "precision": precision,
            "resolution": attrs["root"]["tilenet"]["resolution"],
            "patches": len(plan.windows),
            "extra": extra,
        }
        key = run_key(identity)
        attrs["root"]["tilenet"]["key"] = key
        result = EmbedResult(str(final), len(plan.windows), spec.dim)
        final.parent.mkdir(parents=True, exist_ok=True)
        with hold_output(final, wait=wait, what="tilenet embed", beside=True):
            if not force and finished_key(final, cfg.format) == key:
                result.skipped = True
                return result
            writer = writer_cls(final, dim=spec.dim, key=key, attrs=attrs)
            result.rows_resumed = writer.start()
            try:
                _run(plan, loaded, cfg, device, precision, writer, transform, result, progress)
            except BaseException:
                writer.close()
                raise
            writer.publish()
    finally:
        image.close()
    result.seconds = time.perf_counter() - t0
    return result


def _batch_reader(plan: EmbedPlan, decode: bool) -> Callable[[tuple[int, int]], torch.Tensor]:
    """Reads patches ``i:j`` as one uint8 (B, 3, P, P) CPU tensor (in a reader thread).

    Where the level has a raw path, only the stored tiles are fetched and the ``cpu``
    decoder decodes each tile the batch touches once (a row of patches shares tiles); else
    each patch is read (and resampled) by the image itself.
    """
    image, level, path = plan.image, plan.level, plan.image.path

    def read(span: tuple[int, int]) -> torch.Tensor:
        decoder = DECODERS["cpu"]() if decode else None
        items: list[np.ndarray | EncodedWindow] = []
        for win in plan.windows[span[0] : span[1]]:
            ew = image.encoded(win, level) if decoder is not None else None
            if ew is not None and ew.codec in decoder.codecs:  # type: ignore[union-attr]
                items.append(ew)
            else:
                items.append(_rgb(image.read(win, level), path))
        return _pixels(items, decoder, path)

    return read


def _pixels(items: Sequence[Any], decoder: Any, path: Any) -> torch.Tensor:
    """A read batch as uint8 (B, 3, P, P) on the CPU (channels_last memory)."""
    import torch

    if decoder is not None and all(isinstance(a, EncodedWindow) for a in items):
        x = decoder.decode(list(items), "cpu")
        if x.shape[1] == 1:
            return x.expand(-1, 3, -1, -1)
        return x[:, :3]
    arrays = [_rgb(decode_window(a), path) if isinstance(a, EncodedWindow) else a for a in items]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _run(
    plan: EmbedPlan,
    loaded: LoadedEncoder,
    cfg: EmbedConfig,
    device: Any,
    precision: str,
    writer: Any,
    transform: Transform | None,
    result: EmbedResult,
    progress: bool,
) -> None:
    import torch

    start, n = result.rows_resumed, len(plan.windows)
    if start % cfg.batch and start != n:
        raise InputError(f"{writer.partial}: resume marker off a batch boundary; delete it")
    module = prepare_model(loaded.encoder.to(device))
    prep = encoder_input(loaded.encoder.spec, device)
    pin = device.type == "cuda"
    bar = progress_bar(n, desc="embed", unit="patch", enabled=progress, initial=start)

    def encode(x: torch.Tensor) -> np.ndarray:
        if pin:
            x = x.pin_memory()
        x = x.to(device, non_blocking=pin)
        if transform is not None:
            x = transform(x)
        with torch.inference_mode(), autocast(device, precision):
            return module(prep(x)).float().cpu().numpy()

    def write(job: tuple[np.ndarray, np.ndarray, bool]) -> None:
        feats, coords, mark = job
        writer.append(feats, coords)
        if mark:
            writer.checkpoint()

    batches = [(start + a, start + b) for a, b in spans(n - start, cfg.batch)]
    # Whole batches are read ahead, each by one thread: decoding overlaps the model.
    reads = prefetch(
        batches, _batch_reader(plan, cfg.decode), workers=cfg.readers, depth=cfg.readers + 1
    )
    with BackgroundWriter[tuple[np.ndarray, np.ndarray, bool]](write, depth=2) as out:
        try:
            _loop(plan, cfg, reads, encode, out, bar, result)
        except BaseException:  # Ctrl-C, a failed read: keep what was encoded for the resume
            try:
                out.close()
                writer.checkpoint()
            except Exception:
                pass
            raise
        out.close()
    bar.close()


def _loop(
    plan: EmbedPlan,
    cfg: EmbedConfig,
    reads: Iterator[tuple[tuple[int, int], torch.Tensor]],
    encode: Callable[[torch.Tensor], np.ndarray],
    out: BackgroundWriter[tuple[np.ndarray, np.ndarray, bool]],
    bar: Any,
    result: EmbedResult,
) -> None:
    """Read batches -> features, submitted to the writer with their coords."""
    t_wait = time.perf_counter()
    for (i, j), x in reads:
        result.read_wait_s += time.perf_counter() - t_wait
        t1 = time.perf_counter()
        rows = encode(x)
        result.model_s += time.perf_counter() - t1
        mark = (j // cfg.batch) % cfg.checkpoint_every == 0
        out.submit((rows, plan.coords[i:j], mark))
        bar.update(j - i)
        t_wait = time.perf_counter()


# -- tissue and stain for a slide (picklable: module-level, bound with functools.partial) ----
def tissue_filter(image: LazyImage, *, fraction: float) -> Keep:
    """Keep a patch whose level-0 window has at least ``fraction`` on the tissue mask of
    ``image`` (:func:`tilenet.tissue.detect_tissue`, its default parameters; 0: any tissue)."""
    from tilenet.tissue import detect_tissue

    mask = detect_tissue(image)

    def keep(w: Window) -> bool:
        f = mask.fraction(w.y, w.x, w.h, w.w)
        return f > 0 if fraction <= 0 else f >= fraction

    return keep


def stain_transform(
    image: LazyImage,
    *,
    reference: str | None = None,
    method: str = "macenko",
    state: Mapping[str, Any] | None = None,
) -> Transform:
    """A stain normaliser fitted once to the image at ``reference`` (or the fitted one
    ``state`` describes: :func:`tilenet.stain.plain_state`), its source estimated once from
    ``image``'s tissue: one transform for every patch of a slide
    (:func:`tilenet.engine.perimage.slide_stain`)."""
    from tilenet.engine.perimage import slide_stain

    return cast(Transform, slide_stain(image, reference, method, state=state))
