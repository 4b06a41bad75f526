"""Background stages for tiled inference: a bounded read-ahead pool and a writer thread.

Reading (decode + normalise) runs in a thread pool ahead of the model; tifffile, imagecodecs
and numpy release the GIL, so threads overlap with the forward pass. Writing runs in one
background thread fed by a bounded queue, so there is exactly one writer (no chunk is ever
written from two places) and memory stays bounded by the queue depths, never by the image.

The host memory policy these stages run under is :func:`tilenet.runtime.heap_policy`.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

__all__ = ["BackgroundWriter", "prefetch"]

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
