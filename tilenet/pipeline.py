"""Background stages for tiled inference: a bounded read-ahead pool and a writer thread.

Reading (decode + normalise) runs in a thread pool ahead of the model; tifffile, imagecodecs
and numpy release the GIL, so threads overlap with the forward pass. Writing runs in one
background thread fed by a bounded queue, so there is exactly one writer (no chunk is ever
written from two places) and memory stays bounded by the queue depths, never by the image.

The host memory policy lives here too: :func:`keep_freed_memory` + :class:`HeapGuard`
(``--heap reuse``, the default) or :func:`map_large_buffers` (``--heap flat``).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

__all__ = [
    "BackgroundWriter",
    "HeapGuard",
    "keep_freed_memory",
    "malloc_trim",
    "map_large_buffers",
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


def _libc() -> Any:
    """glibc via ctypes, or None off glibc."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import platform

        _LIBC = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _LIBC = ctypes.CDLL("libc.so.6")
            except OSError:
                pass
    return _LIBC or None


_LIBC: Any = None
# mallopt parameters from <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    )


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc keep freed buffers up to ``mmap_threshold`` mapped for reuse (process-wide).

    A CPU forward pass allocates and frees activations of tens of MB per layer and batch.
    glibc's defaults serve those above 32 MiB with a fresh ``mmap`` and give freed heap tops
    back to the OS, so every batch page-faults its activations in again: measured ~300k
    faults and ~40 % of the CPU time in the kernel per batch of 4 x 1024² tiles of a small
    U-Net. With a high mmap threshold and trim threshold they come from the heap and are
    reused: 0.43 instead of 0.79 s per batch (1024² tiles), 0.10 instead of 0.14 s (512²).
    What is kept is handed back by :class:`HeapGuard` every few batches and by a final
    :func:`malloc_trim`. No-op (returns False) off glibc.
    """
    return _mallopt(mmap_threshold, trim_threshold)


def map_large_buffers(mmap_threshold: int = 128 << 10) -> bool:
    """Serve every buffer above ``mmap_threshold`` from its own mapping (process-wide).

    The opposite trade-off to :func:`keep_freed_memory`: freed buffers go straight back to
    the OS, so no heap fragments can accumulate and peak RSS stays flat however many tiles
    run (measured +0.3 % and +0.9 % from 8192² to 32768²), but every large activation is page-faulted
    in again (CPU forward passes 1.4-1.8x slower). ``tilenet infer --heap flat``. No-op
    (returns False) off glibc.
    """
    return _mallopt(mmap_threshold, 128 << 10)


def malloc_trim() -> bool:
    """Return the free memory of every glibc arena to the OS (``malloc_trim(0)``).

    Tiled inference frees and reallocates tile-sized buffers (activations, decoded tiles,
    encoded chunks) in several threads. Freed memory that stays mapped is reused (fast), but
    fragments that no later request fits can pile up and grow the peak RSS with the image.
    :class:`HeapGuard` calls this every few batches, so that free pages are handed back
    (``MADV_DONTNEED``) instead of accumulating. Measured alternative: a fixed small
    ``M_MMAP_THRESHOLD`` (the engine's setting before) was flat too but made every large
    activation a fresh mapping, ~1.8x slower on a CPU U-Net (docs/benchmarks.md). No-op
    (returns False) off glibc.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class HeapGuard:
    """Hand the heap's free fragments back to the OS every ``every`` batches.

    Freed memory is reused between trims (fast: no page faults for the next batch's
    activations), and fragments that no later request fits cannot pile up for long.
    ``check()`` after each batch. Measured (docs/benchmarks.md): trimming every batch gives
    back most of what keeping memory gains; trimming on RSS drift instead trimmed after most
    batches wherever batch sizes alternate (crop mode cuts batches at grid rows) and was
    ~30 % slower; every 8 batches kept the speed.
    """

    def __init__(self, every: int = 8) -> None:
        self.every = max(1, every)
        self.batches = 0
        self.trims = 0

    def check(self) -> None:
        self.batches += 1
        if self.batches % self.every == 0:
            malloc_trim()
            self.trims += 1


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
