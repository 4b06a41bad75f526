"""The predictor: a model made ready for tiled inference, run over tiles into a stitcher.

:class:`Predictor` is the engine's public seam (in the spirit of nnU-Net's predictor and
MONAI's splitter/merger pair). ``tilenet infer``, batch jobs (whole images and row bands),
training's whole-image validation and the benchmarks all run tiles through one::

    predictor = Predictor("best.pt", InferConfig(device="cpu"))
    grid, halo = predictor.plan(image.levels[0].shape)
    stats = predictor.run(image, list(grid), STITCHERS["crop"](grid, sink, scratch), grid=grid)

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
from the whole image's (:func:`tilenet.models.exactness` names the layer); a ``halo``
override below the receptive field; and reduced precision (bf16/fp16). Such models get a
warning in crop mode; use ``mode="gaussian"`` for them.

Test-time augmentation (``tta``) averages the softmax over the four flips. A flipped read
window is still stride-aligned inside the flipped (stride-padded) image, so crop-mode TTA
equals whole-image TTA too.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tilenet.config import InferConfig
from tilenet.engine.decode import DECODERS, Decoder, choose_decoder, decoder_for
from tilenet.engine.pipeline import (
    BackgroundWriter,
    DeviceStreams,
    HostCopy,
    Masked,
    TileReader,
    mark_invalid,
    prefetch,
)
from tilenet.engine.stitch import Stitcher
from tilenet.engine.tiles import batches, plan_grid
from tilenet.errors import InputError
from tilenet.geometry import Tile, TileGrid, Window
from tilenet.io.source import EncodedWindow, decode_window
from tilenet.models.spec import ModelSpec
from tilenet.normalize import Normalizer
from tilenet.runtime import autocast, heap_policy, resolve_device, resolve_precision

if TYPE_CHECKING:
    import torch

__all__ = [
    "Predictor",
    "RunStats",
    "predict",
    "prepare_model",
]

log = logging.getLogger(__name__)

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


def prepare_model(module: torch.nn.Module) -> torch.nn.Module:
    """Make a loaded model ready for inference, in place: eval mode, BatchNorm folded into
    the convolutions before it (:func:`tilenet.models.fuse.fuse_conv_bn`), channels_last.

    Returns ``module``. A :class:`Predictor` calls it once per loaded model; benchmarks call
    it so that "the model alone" is the same model the engine runs.
    """
    import torch

    from tilenet.models.fuse import fuse_conv_bn

    module.eval()
    if not getattr(module, "_tilenet_prepared", False):
        n = fuse_conv_bn(module)
        log.debug("folded %d BatchNorm layers into convolutions", n)
        module._tilenet_prepared = True  # type: ignore[assignment]
    return module.to(memory_format=torch.channels_last)


# -- the predictor --------------------------------------------------------------------------
@dataclass
class RunStats:
    """What one :meth:`Predictor.run` did."""

    tiles: int = 0
    tiles_run: int = 0
    #: Wall and CPU seconds of the whole run (read, model, stitch).
    seconds: float = 0.0
    cpu_s: float = 0.0
    #: Seconds in the model (input transfer, forward, softmax, output transfer).
    model_s: float = 0.0
    #: Seconds the model waited for tiles to be read.
    read_wait_s: float = 0.0
    heap_trims: int = 0
    #: Seconds the GPU spent in the model (CUDA events around each batch; 0 on the CPU).
    device_s: float = 0.0
    #: Which decoder ran and why: {"decoder": name or "read", "reason": ..., "tiles": {path:
    #: distinct tiles decoded}} (``summary.json``'s ``decode``).
    decode: dict[str, Any] = field(default_factory=dict)
    #: The batch after which the ``reuse`` heap policy hit its ceiling and went ``flat``
    #: (None: it did not; see :class:`tilenet.runtime.HeapGuard`).
    heap_flat_after: int | None = None


#: Loaded, prepared models by (checkpoint, size, mtime, device): a dask worker runs many
#: bands of one model and loads it once.
_LOADED: dict[tuple[str, int, int, str], tuple[Any, ModelSpec]] = {}


class Predictor:
    """A model ready for tiled inference under an :class:`InferConfig`.

    ``model`` is a checkpoint path, a ``(module, spec)`` pair (the module is copied, never
    changed), or another Predictor (its prepared model is shared). The model is put in eval
    mode with BatchNorm folded and channels_last (:func:`prepare_model`) on ``cfg.device``.
    ``cache=True`` keeps a checkpoint's prepared model for the next Predictor of the same
    file in this process (batch workers). ``decoder`` names a :data:`DECODERS` entry to run
    whatever ``cfg.decode`` says (tests, benchmarks); by default :func:`choose_decoder` picks
    per image. ``precision`` is ``cfg.precision`` with ``auto`` resolved for the device.
    """

    def __init__(
        self,
        model: Any,
        cfg: InferConfig | None = None,
        *,
        cache: bool = False,
        decoder: str | None = None,
    ) -> None:
        from tilenet.models import exactness

        self.config = cfg if cfg is not None else InferConfig()
        self.device = resolve_device(self.config.device)
        self.precision = resolve_precision(self.config.precision, self.device)
        if decoder is None and isinstance(model, Predictor):
            decoder = model.decoder
        if decoder is not None and decoder not in DECODERS:
            raise InputError(f"unknown decoder {decoder!r}; registered: {', '.join(DECODERS)}")
        self.decoder: str | None = decoder
        if decoder is None and self.config.decode == "gpu":
            choose_decoder("gpu", self.device, None)  # off CUDA: the one-line error, now
        self.checkpoint: str | None = None
        self.module: torch.nn.Module
        self.spec: ModelSpec
        if isinstance(model, Predictor):
            self.module, self.spec, self.checkpoint = model.module, model.spec, model.checkpoint
            if model.device != self.device:
                self.module = copy.deepcopy(model.module).to(self.device)
        elif isinstance(model, str | os.PathLike):
            self.checkpoint = str(model)
            self.module, self.spec = self._load(Path(model), cache=cache)
        else:
            try:
                module, spec = model
            except (TypeError, ValueError):
                raise InputError(
                    "model must be a checkpoint path, a (module, spec) pair or a Predictor, "
                    f"got {type(model).__name__}"
                ) from None
            self.spec = ModelSpec.coerce(spec)
            # A caller's module is left as it was: folding works on a copy.
            self.module = prepare_model(copy.deepcopy(module).to(self.device))
        if self.config.compile:  # torch.compile (tilenet.engine.backends): opt-in
            from tilenet.engine.backends import compile_model

            self.module = compile_model(self.module, name=self.spec.name)
        if self.spec.exact is not None:
            self.exact, self.exact_reason = self.spec.exact, self.spec.exact_reason
        else:
            self.exact, self.exact_reason = exactness(self.module)
        if self.config.mode == "crop" and not self.exact:
            log.warning(
                "model %s: crop mode is not exact (%s); prefer --mode gaussian",
                self.spec.name,
                self.exact_reason or "it normalises over each tile",
            )
        if self.spec.num_classes > 255:
            raise InputError(
                f"model has {self.spec.num_classes} classes; class maps are uint8 (at most 255)"
            )

    def _load(self, path: Path, *, cache: bool) -> tuple[Any, ModelSpec]:
        from tilenet.engine.checkpoint import load_model

        key: tuple[str, int, int, str] | None = None
        if cache and path.is_file():
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(self.device))
            if key in _LOADED:
                return _LOADED[key]
        module, spec = load_model(path, device=self.device)
        loaded = (prepare_model(module), ModelSpec.coerce(spec))
        if key is not None:
            _LOADED[key] = loaded
        return loaded

    # -- planning ---------------------------------------------------------------------------
    def with_config(self, cfg: InferConfig) -> Predictor:
        """The same prepared model under other options (no copy unless the device changes)."""
        return Predictor(self, cfg)

    def plan(self, shape: tuple[int, int]) -> tuple[TileGrid, int]:
        """The tile grid (and halo) this predictor runs over an image of ``shape``."""
        return plan_grid(shape, self.spec, self.config)

    @property
    def run_is_exact(self) -> bool:
        """Whether crop-mode output equals a whole-image pass for these options."""
        cfg = self.config
        enough = cfg.halo is None or cfg.halo >= self.spec.receptive_field
        return bool(self.exact and cfg.mode == "crop" and self.precision == "fp32" and enough)

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        image: Any,
        tiles: Sequence[Tile],
        stitcher: Stitcher,
        *,
        grid: TileGrid,
        skip: np.ndarray | None = None,
        on_tiles: Callable[[int], None] | None = None,
        decoder: Decoder | None = None,
        stain: Callable[[Any], Any] | None = None,
    ) -> RunStats:
        """Run ``tiles`` of ``image`` (at ``config.level``) through the model into ``stitcher``.

        Tiles are read ahead in ``config.readers`` threads, batched (``config.batch``, never
        across grid rows in crop mode), normalised on the device, and their probabilities
        stitched by one background writer thread. ``skip[i]`` marks tiles written as
        background without running the model. ``on_tiles(n)`` reports progress. The host
        memory policy ``config.heap`` is in force only during the call
        (:func:`tilenet.runtime.heap_policy`). The stitcher is closed before returning.

        ``decoder`` (:mod:`tilenet.engine.decode`): reader threads fetch the stored tiles
        only (``image.encoded``) and ``decoder`` decodes each batch onto the device; windows
        without a raw path, or in a codec it does not take, are read as without it. Without
        one, the predictor's own choice (``decoder`` at construction, else
        ``config.decode`` through :func:`choose_decoder`); ``stats.decode`` says which ran.

        On a CUDA device the batches stream (:class:`DeviceStreams`): the next batch is copied
        over and queued before the previous one's results are waited for. On the CPU each
        batch runs to its results before the next, as it always has. ``stain`` (uint8 RGB tiles
        only; :mod:`tilenet.stain`) recolours each batch on the device before it is normalised.
        """
        import torch

        cfg = self.config
        streams = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            streams = DeviceStreams(self.device)
        crop = cfg.mode == "crop"
        # uint8 tiles travel as uint8 (4x fewer bytes to the device, 4x less read-ahead
        # memory) and are normalised there; other dtypes become float32 here.
        keep_raw = np.dtype(image.dtype) == np.uint8
        decoder, decode_info = self._decoder(image, tiles, decoder)
        reader = TileReader(
            image,
            cfg.level,
            keep_raw=keep_raw,
            encoded=decoder is not None,
            codecs=decoder.codecs if decoder is not None else frozenset(),
        )
        normalize = Normalizer(self.spec.mean, self.spec.std, device=self.device)
        inputs = _Inputs(self.device, normalize, grid.shape, decoder, keep_raw, stain)
        outputs = _Outputs(grid.shape, self.spec.num_classes, crop=crop)
        skip = np.zeros(len(tiles), dtype=bool) if skip is None else skip

        stats = RunStats(tiles=len(tiles), tiles_run=int((~skip).sum()), decode=decode_info)
        t_start, c_start = time.perf_counter(), time.process_time()
        pending: tuple[_Batch, list[Window], HostCopy] | None = None
        items = [(i, t, bool(skip[i])) for i, t in enumerate(tiles)]
        depth = max(2 * cfg.batch, 2 * cfg.readers)
        with (
            heap_policy(cfg.heap) as guard,
            BackgroundWriter[tuple[Any, ...]](
                lambda job: stitcher.add(*job), depth=2 * cfg.batch
            ) as writer,
        ):
            reads = prefetch(items, reader, workers=cfg.readers, depth=depth)
            t0 = time.perf_counter()
            for batch in batches(reads, cfg.batch, by_row=crop):
                stats.read_wait_s += time.perf_counter() - t0
                if batch[0][1]:
                    if pending is not None:  # the stitcher takes tiles in the run's order
                        self._deliver(pending, writer, stats)
                        pending = None
                    for tile, _, arr in batch:
                        writer.submit((tile, outputs.background(tile, arr)))
                elif streams is None:
                    t1 = time.perf_counter()
                    for tile, p in self._predict(inputs(batch), batch, outputs):
                        writer.submit((tile, p))
                    stats.model_s += time.perf_counter() - t1
                    guard.check()  # keeps peak RSS flat on huge images (see runtime)
                else:
                    t1 = time.perf_counter()
                    queued = self._launch(streams, inputs, batch, outputs)
                    if pending is not None:
                        self._deliver(pending, writer, stats)
                    pending = queued
                    stats.model_s += time.perf_counter() - t1
                    guard.check()  # keeps peak RSS flat on huge images (see runtime)
                if on_tiles is not None:
                    on_tiles(len(batch))
                t0 = time.perf_counter()
            if pending is not None:
                self._deliver(pending, writer, stats)
            writer.close()
            stitcher.close()
        if decoder is not None:
            stats.decode["tiles"] = dict(getattr(decoder, "tiles", {}))
        stats.heap_trims = guard.trims
        stats.heap_flat_after = guard.went_flat_at
        stats.seconds = time.perf_counter() - t_start
        stats.cpu_s = time.process_time() - c_start
        return stats

    def _predict(
        self, x: torch.Tensor, batch: _Batch, outputs: _Outputs
    ) -> Iterator[tuple[Tile, np.ndarray]]:
        """Each tile of ``batch`` with its probabilities (what the stitcher takes), on the host."""
        import torch

        regions = [outputs.region(tile) for tile, _, _ in batch]
        with torch.inference_mode(), autocast(self.device, self.precision):
            probs = predict(self.module, x, tta=self.config.tta, regions=regions)
        for (tile, _, arr), p, r in zip(batch, probs, regions, strict=True):
            yield tile, mark_invalid(p.contiguous().cpu().numpy(), arr, r)

    # -- CUDA: streamed batches (never on the CPU) ------------------------------------------
    def _launch(
        self, streams: DeviceStreams, inputs: _Inputs, batch: _Batch, outputs: _Outputs
    ) -> tuple[_Batch, list[Window], HostCopy]:
        """Queue ``batch``'s input copy, model and copy back; returns without waiting."""
        import torch

        x = streams.inputs(lambda: inputs(batch))
        regions = [outputs.region(tile) for tile, _, _ in batch]
        with torch.inference_mode():
            with autocast(self.device, self.precision), streams.model() as marks:
                probs = predict(self.module, x, tta=self.config.tta, regions=regions)
            copy = streams.to_host(probs, marks)
        return batch, regions, copy

    @staticmethod
    def _deliver(
        pending: tuple[_Batch, list[Window], HostCopy],
        writer: BackgroundWriter[Any],
        stats: RunStats,
    ) -> None:
        """Wait for a launched batch's results and hand them to the writer (NaN where the
        input has no data, as on the CPU path)."""
        batch, regions, copy = pending
        for (tile, _, arr), p, r in zip(batch, copy.wait(), regions, strict=True):
            writer.submit((tile, mark_invalid(p, arr, r)))
        stats.device_s += copy.busy_s

    def _decoder(
        self, image: Any, tiles: Sequence[Tile], given: Decoder | None
    ) -> tuple[Decoder | None, dict[str, Any]]:
        """The decoder of this run (None: the reader's ``read``) and the record of why."""
        if given is not None:
            return given, {"decoder": type(given).__name__, "reason": "given to run()"}
        if self.decoder is not None:
            return DECODERS[self.decoder](), {"decoder": self.decoder, "reason": "given"}
        if not tiles:
            return None, {"decoder": "read", "reason": "no tiles"}
        return decoder_for(image, self.config.level, self.config.decode, self.device)


# (tile, skipped, pixels | EncodedWindow | Masked | None)
_Batch = list[tuple[Tile, bool, Any]]


@dataclass(frozen=True)
class _Inputs:
    """Raw (B, h, w, C) tiles -> normalised channels_last (B, C, h, w) on the device.

    Past the image of ``shape`` (alignment rows and columns) the input is zero *after*
    normalisation, like the network's own zero padding at the image border. Pixels without
    data (nodata, alpha 0, masked: ``Masked`` tiles) come filled with
    :data:`~tilenet.normalize.NODATA_FILL` by the reader, before stain normalisation and
    normalisation, as training patches hold them, whatever value the file stores.
    """

    device: torch.device
    normalize: Normalizer
    shape: tuple[int, int]
    decoder: Decoder | None = None
    keep_raw: bool = True
    #: uint8 (B, 3, h, w) -> uint8 on the device before normalising (tilenet.stain).
    stain: Callable[[Any], Any] | None = None

    def __call__(self, batch: _Batch) -> torch.Tensor:
        import torch

        device = self.device
        pin = device.type == "cuda"
        # A batch holds read tiles only (skipped ones pass alone): a Masked has pixels.
        items: list[Any] = [a.pixels if isinstance(a, Masked) else a for _, _, a in batch]
        if self.decoder is not None and all(isinstance(a, EncodedWindow) for a in items):
            x = self.decoder.decode(items, device)
            if self.stain is not None and x.dtype == torch.uint8:
                x = self.stain(x)
            x = x.float()
        else:
            arrays = [self._pixels(a) for a in items]
            if pin:  # stacked straight into pinned memory: one host copy, async to the GPU
                dtype = torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
                x = torch.empty((len(arrays), *arrays[0].shape), dtype=dtype, pin_memory=True)
                np.stack(arrays, out=x.numpy())
            else:
                x = torch.from_numpy(np.stack(arrays))
            # NHWC memory viewed as NCHW is channels_last: no copy, and the ops keep it.
            x = x.to(device, non_blocking=pin).permute(0, 3, 1, 2)
            if self.stain is not None and x.dtype == torch.uint8:
                x = self.stain(x).contiguous(memory_format=torch.channels_last)
            x = x.float()
        self.normalize(x)  # in place, as training batches are
        h, w = self.shape
        for j, (tile, _, _) in enumerate(batch):
            r = tile.read
            x[j, :, max(0, h - r.y) :, :] = 0
            x[j, :, :, max(0, w - r.x) :] = 0
        return x

    def _pixels(self, item: np.ndarray | EncodedWindow) -> np.ndarray:
        """A read tile, or an encoded one in a batch the decoder does not take whole."""
        if not isinstance(item, EncodedWindow):
            return item
        raw = decode_window(item)
        return raw if self.keep_raw else raw.astype(np.float32)


@dataclass(frozen=True)
class _Outputs:
    """What the stitcher takes of a tile: its core (crop mode) or its read window clipped
    to the image of ``shape`` (blend modes)."""

    shape: tuple[int, int]
    num_classes: int
    crop: bool

    def region(self, tile: Tile) -> Window:
        """That part in read-window coordinates."""
        return (
            tile.core_in_read if self.crop else tile.read.clip(*self.shape).relative_to(tile.read)
        )

    def background(self, tile: Tile, item: Any = None) -> np.ndarray:
        """Probabilities of a skipped tile: class 0 everywhere (NaN where a ``Masked``
        ``item`` says there is no data)."""
        win = tile.core if self.crop else tile.read.clip(*self.shape)
        p = np.zeros((self.num_classes, win.h, win.w), np.float32)
        p[0] = 1.0
        return mark_invalid(p, item, self.region(tile))
