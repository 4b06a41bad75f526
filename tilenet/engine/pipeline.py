"""Background stages for tiled inference: a bounded read-ahead pool and a writer thread.

Reading (decode + normalise) runs in a thread pool ahead of the model; tifffile, imagecodecs
and numpy release the GIL, so threads overlap with the forward pass. Writing runs in one
background thread fed by a bounded queue, so there is exactly one writer (no chunk is ever
written from two places) and memory stays bounded by the queue depths, never by the image. :class:`TileReader` is what the read-ahead runs per
tile (pixels, the stored tile bytes for a decoder, or pixels with their validity mask).

On a CUDA device, :class:`DeviceStreams` overlaps the copy of one batch to the device, the
model, and the copy back of the previous batch's results (pinned host memory, non-blocking
copies, one stream each). The host memory policy these stages run under is
:func:`tilenet.runtime.heap_policy`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import numpy as np

from tilenet.geometry import Tile, Window
from tilenet.io.source import EncodedWindow
from tilenet.normalize import fill_nodata

__all__ = [
    "BackgroundWriter",
    "DeviceStreams",
    "HostCopy",
    "Masked",
    "TileReader",
    "mark_invalid",
    "prefetch",
]

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Iterable[T], fn: Callable[[T], R], *, workers: int = 2, depth: int = 8
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in input order, computing up to ``depth`` results ahead.

    At most ``depth`` results are alive at once, so memory is bounded by ``depth`` tiles.

    >>> [r for _, r in prefetch(range(5), lambda i: i * i, workers=2, depth=2)]
    [0, 1, 4, 9, 16]
    """
    depth = max(1, depth)
    pending: deque[tuple[T, Future[R]]] = deque()
    it = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tilenet-read") as ex:
        try:
            for item in it:
                pending.append((item, ex.submit(fn, item)))
                if len(pending) >= depth:
                    head, fut = pending.popleft()
                    yield head, fut.result()
            while pending:
                head, fut = pending.popleft()
                yield head, fut.result()
        finally:
            # On an error or an abandoned generator, drop queued reads instead of running them.
            for _, fut in pending:
                fut.cancel()


class BackgroundWriter(Generic[T]):
    """Run ``fn(item)`` for each submitted item in one background thread, in order.

    ``submit`` blocks when ``depth`` items are waiting (back-pressure bounds memory). An
    exception in ``fn`` is re-raised by the next ``submit`` or by ``close``.
    """

    _STOP = object()

    def __init__(self, fn: Callable[[T], Any], *, depth: int = 4) -> None:
        self._fn = fn
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="tilenet-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is self._STOP:
                    return
                if self._error is None and not self._abort:  # after a failure, just drain
                    self._fn(item)
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, item: T) -> None:
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every submitted item to be written; re-raise a writer error."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter[T]:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: skip what is queued, stop, keep the original exception
            self._abort = True
            if self._thread.is_alive():
                self._queue.put(self._STOP)
                self._thread.join()


class DeviceStreams:
    """CUDA streams that overlap one batch's input copy, the model, and the copy back of
    the batch before it.

    :meth:`inputs` runs the input stage (host-to-device copies from pinned memory, device
    decode, normalisation) on a copy stream, and the compute stream waits for it; the model
    runs on the compute stream (:meth:`model`, between timing events); :meth:`to_host`
    copies its results into pinned host memory on a third stream, and the returned
    :class:`HostCopy` is waited for only after the next batch has been queued. All three are
    side streams: the default stream stays idle, so a library that signals the default
    stream when its work is done (some torchvision releases' nvJPEG path) is waited for
    without waiting for the model. Only for a CUDA device: CPU runs never build one.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.copy = torch.cuda.Stream(device)
        self.back = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)

    def inputs(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a device tensor) made on the copy stream, ready for the compute stream."""
        import torch

        with torch.cuda.stream(self.copy):
            x = fn()
        self.compute.wait_stream(self.copy)
        x.record_stream(self.compute)  # the allocator must not reuse it before the model ran
        return x

    @contextlib.contextmanager
    def model(self) -> Iterator[tuple[Any, Any]]:
        """Run the block on the compute stream between a (start, end) pair of timing events."""
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.compute):
            start.record(self.compute)
            yield start, end
            end.record(self.compute)

    def to_host(self, tensors: Iterable[Any], marks: tuple[Any, Any] | None = None) -> HostCopy:
        """Copies of ``tensors`` (made on the compute stream) in pinned host memory."""
        import torch

        self.back.wait_stream(self.compute)
        out = []
        with torch.cuda.stream(self.back):
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(self.back)
                out.append(host)
            done = torch.cuda.Event()
            done.record(self.back)
        return HostCopy(out, done, marks)


class HostCopy:
    """Results on their way to the host: :meth:`wait` gives them as numpy arrays."""

    def __init__(self, tensors: list[Any], done: Any, marks: tuple[Any, Any] | None) -> None:
        self._tensors, self._done, self._marks = tensors, done, marks
        #: Seconds the compute stream spent between the model's timing events.
        self.busy_s = 0.0

    def wait(self) -> list[Any]:
        self._done.synchronize()
        if self._marks is not None:
            start, end = self._marks
            self.busy_s = start.elapsed_time(end) / 1000.0
        # numpy views of the pinned tensors (each array keeps its tensor alive).
        return [t.numpy() for t in self._tensors]


# -- the validity mask ---------------------------------------------------------------------
@dataclass(frozen=True)
class Masked:
    """A read tile of an image with nodata, alpha or a dataset mask: its pixels (None for a
    skipped tile), :data:`~tilenet.normalize.NODATA_FILL` where there is no data, and
    ``valid`` (h, w) over its read window (:meth:`tilenet.io.base.LazyImage.read_masked`)."""

    pixels: np.ndarray | None
    valid: np.ndarray


def mark_invalid(probs: np.ndarray, item: Any, region: Window) -> np.ndarray:
    """``probs`` of ``region`` (of the read window) with NaN where the input has no data:
    the stitchers carry NaN through (every tile covering a pixel agrees on it) and the sink
    writes those pixels as nodata (:class:`tilenet.outputs.sink.OutputSink`)."""
    if not isinstance(item, Masked):
        return probs
    invalid = ~item.valid[region.slices]
    if invalid.any():
        probs = probs.copy()
        probs[:, invalid] = np.nan
    return probs


@dataclass(frozen=True)
class TileReader:
    """Reads a tile's window of ``image`` at ``level`` (in a reader thread); a skipped tile
    reads nothing. ``keep_raw``: the pixels stay in the image's dtype, else float32.
    ``encoded``: the stored tiles where the image has a raw path for the window."""

    image: Any
    level: int
    keep_raw: bool
    encoded: bool = False
    #: The codecs the decoder takes; other windows are read.
    codecs: frozenset[str] = frozenset()

    def __call__(self, item: tuple[int, Tile, bool]) -> np.ndarray | EncodedWindow | Masked | None:
        _, tile, skipped = item
        masked = bool(getattr(self.image, "masked", False))
        if skipped:
            return Masked(None, self.image.valid(tile.read, self.level)) if masked else None
        if masked:  # the mask comes from the decoded pixels: no raw path
            raw, valid = self.image.read_masked(tile.read, self.level)
            raw = fill_nodata(raw, valid)  # as training patches hold them
            return Masked(raw if self.keep_raw else raw.astype(np.float32), valid)
        ew = self.image.encoded(tile.read, self.level) if self.encoded else None
        if ew is not None and ew.codec in self.codecs:
            return cast(EncodedWindow, ew)
        raw = self.image.read(tile.read, self.level)
        return raw if self.keep_raw else raw.astype(np.float32)
