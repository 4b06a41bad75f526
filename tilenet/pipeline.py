"""Background stages for tiled inference: a bounded read-ahead pool and a writer thread.

Reading (decode + normalise) runs in a thread pool ahead of the model; tifffile, imagecodecs
and numpy release the GIL, so threads overlap with the forward pass. Writing runs in one
background thread fed by a bounded queue, so there is exactly one writer (no chunk is ever
written from two places) and memory stays bounded by the queue depths, never by the image.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

__all__ = [
    "BackgroundWriter",
    "HeapGuard",
    "current_rss",
    "keep_freed_memory",
    "malloc_trim",
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
_HEAP_KEPT = False
# mallopt parameters from <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc keep freed buffers up to ``mmap_threshold`` mapped for reuse (process-wide).

    A CPU forward pass allocates and frees activations of tens of MB per layer and batch.
    glibc's defaults serve those above 32 MiB with a fresh ``mmap`` and give freed heap tops
    back to the OS, so every batch page-faults its activations in again: measured ~300k
    faults and ~40 % of the CPU time in the kernel per batch of 4 x 1024² tiles of a small
    U-Net. With a high mmap threshold and trim threshold they come from the heap and are
    reused: 0.43 instead of 0.79 s per batch (1024² tiles), 0.10 instead of 0.14 s (512²).
    Memory then stays bounded by :class:`HeapGuard`, which trims the heap when resident memory
    drifts above the working level, and by a final :func:`malloc_trim`. Idempotent; no-op
    (returns False) off glibc.
    """
    global _HEAP_KEPT
    libc = _libc()
    if libc is None:
        return False
    if not _HEAP_KEPT:
        _HEAP_KEPT = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
        )
    return _HEAP_KEPT


def malloc_trim() -> bool:
    """Return the free memory of every glibc arena to the OS (``malloc_trim(0)``).

    Tiled inference frees and reallocates tile-sized buffers (activations, decoded tiles,
    encoded chunks) in several threads. Freed memory that stays mapped is reused (fast), but
    fragments that no later request fits can pile up and grow the peak RSS with the image.
    :class:`HeapGuard` calls this when they do, so that free pages are handed back
    (``MADV_DONTNEED``) instead of accumulating. Measured alternative: a fixed small
    ``M_MMAP_THRESHOLD`` (the engine's setting before) was flat too but made every large
    activation a fresh mapping, ~1.8x slower on a CPU U-Net (docs/benchmarks.md). No-op
    (returns False) off glibc.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapGuard:
    """Bound the freed-but-kept memory: trim the heap when RSS drifts above its working level.

    ``check()`` after each batch. The RSS after the first batch following a trim is the
    working level: the live data plus the freed activations kept for the next batch. When
    RSS later exceeds it by ``slack`` (a fraction, at least ``min_slack`` bytes), the heap's
    free fragments go back to the OS (:func:`malloc_trim`) and the level is measured again.
    So peak RSS stays within ``slack`` of what the tiles need, however many tiles there are,
    and trimming (which makes the next batch fault its activations in again) happens only
    when fragments actually pile up. Where RSS cannot be read, it trims every ``every``
    batches instead.
    """

    def __init__(self, *, slack: float = 0.05, min_slack: int = 48 << 20, every: int = 8) -> None:
        self.slack = slack
        self.min_slack = min_slack
        self.every = max(1, every)
        self.level = 0
        self.batches = 0
        self.trims = 0

    def _trim(self) -> None:
        if malloc_trim():
            self.trims += 1
        self.level = 0

    def check(self) -> None:
        self.batches += 1
        rss = current_rss()
        if not rss:
            if self.batches % self.every == 0:
                self._trim()
        elif not self.level:
            self.level = rss
        elif rss > self.level + max(self.min_slack, self.slack * self.level):
            self._trim()


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
