"""Where a batch's tasks run: this process, or a dask.distributed cluster.

Every task returns data and never raises (:func:`guarded`): a failure is a one-line error in
its result, and a lost worker's is attributed to its task.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from tilenet.errors import one_line

__all__ = ["DaskExecutor", "SerialExecutor", "guarded", "local_cluster", "one_line"]


def guarded(kind: str, key: Any, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a task; turn its exception into a one-line error in the result."""
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:
        return {"kind": kind, "key": key, "ok": False, "error": one_line(exc)}
    return {
        "kind": kind,
        "key": key,
        "ok": True,
        "result": result,
        "seconds": time.perf_counter() - t0,
    }


class SerialExecutor:
    """Runs tasks in this process, in submission order."""

    dashboard: str | None = None

    def __init__(self) -> None:
        self._queue: deque[tuple[Any, ...]] = deque()

    def submit(self, *args: Any) -> None:
        self._queue.append(args)

    def results(self) -> Iterator[dict[str, Any]]:
        while self._queue:
            yield guarded(*self._queue.popleft())

    def close(self) -> None:
        pass


class DaskExecutor:
    """Submits tasks to a dask.distributed cluster; yields results as they complete."""

    def __init__(self, *, workers: int, scheduler: str | None) -> None:
        from dask.distributed import Client, as_completed

        self.cluster: Any = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            self.cluster = local_cluster(workers)
            self.client = Client(self.cluster)
        self.dashboard: str | None = self.client.dashboard_link
        self._ac = as_completed()
        self._tags: dict[Any, tuple[Any, Any]] = {}  # to attribute a lost worker's failure

    def submit(self, *args: Any) -> None:
        fut = self.client.submit(guarded, *args, pure=False)
        self._tags[fut.key] = (args[0], args[1])
        self._ac.add(fut)

    def results(self) -> Iterator[dict[str, Any]]:
        for fut in self._ac:
            try:
                yield fut.result()
            except Exception as exc:  # a worker died (killed, out of memory)
                kind, key = self._tags[fut.key]
                yield {"kind": kind, "key": key, "ok": False, "error": one_line(exc)}
            fut.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            # A worker that ran torch can take > 4 s to exit on a busy machine; the nanny then
            # kills it (harmless: its work is done) and warns. Keep that warning out of logs.
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                self.cluster.close()
            finally:
                nanny.setLevel(level)


def local_cluster(workers: int, *, gpus: int | None = None) -> Any:
    """N worker processes of one thread; with CUDA, one worker per GPU pinned to it.

    Pinning sets ``CUDA_VISIBLE_DEVICES`` per worker process, so each sees its GPU as cuda:0.
    """
    from dask.distributed import LocalCluster

    gpus = _cuda_count() if gpus is None else gpus
    if gpus:
        from dask.distributed import Nanny, Scheduler, SpecCluster

        n = min(workers, gpus) if workers else gpus
        specs = {
            f"gpu-{i}": {
                "cls": Nanny,
                "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}},
            }
            for i in range(n)
        }
        return SpecCluster(
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
            workers=specs,
        )
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # a free port: several jobs may share the machine
    )


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0
