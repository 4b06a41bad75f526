"""Where and how a run executes: device, autocast, torch threads and the host memory policy.

One owner for what training, inference and the benchmarks all need:

* :func:`resolve_device` turns ``auto`` / ``cpu`` / ``cuda:N`` into a ``torch.device`` with a
  one-line error for a device that is not there;
* :func:`autocast` is the mixed-precision context for ``fp32`` / ``bf16`` / ``fp16``
  (:func:`resolve_precision` turns ``auto`` into one of them for a device);
* :func:`torch_threads` sets torch's intra-op threads for a block and restores them;
* :func:`heap_policy` applies a glibc malloc policy for a block and restores the previous one.

Heap policies (``tilenet infer --heap``)
----------------------------------------
A CPU forward pass allocates and frees activations of tens of MB per layer and batch.
glibc's defaults serve those above its (dynamic, at most 32 MiB) mmap threshold with a fresh
``mmap`` and give freed heap tops back to the OS, so every batch page-faults its activations
in again: measured ~300k faults and ~40 % of the CPU time in the kernel per batch of
4 x 1024² tiles of a small U-Net (docs/benchmarks.md).

``reuse`` (default)
    mmap threshold 256 MiB, trim threshold 1 GiB: freed buffers stay mapped and are reused
    (0.43 instead of 0.79 s per batch at 1024², 0.10 instead of 0.14 s at 512²), and
    :class:`HeapGuard` hands free fragments back with ``malloc_trim(0)`` every 8 batches.
    glibc places the reused buffers where they fit, so the heap they leave behind creeps up
    with the number of batches (fragmentation; +0.1-0.35 GB over the first few hundred
    batches of 4 x 1024² tiles, then it settles). That creep is *capped*: the guard takes the
    RSS before the first batch plus ``ceiling`` (2) times what the first batch added (the
    tile's working set), and if the RSS after a batch ever passes it, the rest of the run
    goes ``flat``. So the peak is bounded by the tile by construction, whatever the image,
    and a run that never reaches the cap (most do) keeps ``reuse``'s speed.
``flat``
    every buffer above 128 KiB is its own mapping, returned when freed: peak RSS flat to
    ~0.3 % from 8192² to 32768², CPU forward passes 1.2-1.8x slower
    (``scripts/bench_alloc.py``).
``trim``
    glibc's own settings, plus the periodic ``malloc_trim``.
``system``
    glibc's own settings, nothing done.

The policy is process-wide while it is in force (glibc has one allocator), so the engine
applies it only around its run and restores what was there before: a notebook or a training
run that calls :func:`tilenet.infer_image` keeps its own settings. glibc has no getter for
these parameters, so this module records what it set; "glibc's defaults" are restored as
their documented values (128 KiB each). Off glibc every policy is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tilenet.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "HEAP_POLICIES",
    "HeapGuard",
    "HeapPolicy",
    "autocast",
    "current_heap_settings",
    "heap_policy",
    "malloc_trim",
    "resolve_device",
    "resolve_precision",
    "torch_threads",
]

Precision = Literal["fp32", "bf16", "fp16"]


# -- device and precision ---------------------------------------------------------------------
def resolve_device(name: str, *, local_rank: int = 0, option: str = "--device") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device.

    A bare ``cuda`` means GPU ``local_rank`` (a torchrun process's own GPU). ``option`` names
    the setting in error messages (``--device``, ``train.device``).
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"unknown device {name!r} for {option}; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise InputError(f"{option} {name!r}: CUDA is not available; use cpu")
    if dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"{option} {name!r}: no such GPU; this machine has {torch.cuda.device_count()}"
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that supports it, fp16 on other GPUs, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for ``bf16``/``fp16`` on ``device``; nothing for ``fp32``."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: leave them), then restore."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# -- host memory policy -----------------------------------------------------------------------
_LIBC: Any = None
# mallopt parameters from <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's documented initial values of both thresholds.
_GLIBC_DEFAULT = (128 << 10, 128 << 10)


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


@dataclass(frozen=True)
class HeapPolicy:
    """A malloc policy: thresholds to set (None: glibc's own) and the trim period (0: none)."""

    name: str
    #: (mmap threshold, trim threshold) in bytes, or None to leave glibc's settings.
    thresholds: tuple[int, int] | None
    #: ``malloc_trim(0)`` every this many model batches; 0 never.
    trim_every: int
    #: The cap on what the policy may hold: when the RSS after a batch passes the RSS before
    #: the first batch plus this many times the first batch's working set, the rest of the
    #: run goes ``flat``. None: no cap (the policy holds nothing it would need to cap).
    ceiling: float | None = None


#: The policies ``InferConfig.heap`` / ``--heap`` may name (see the module docstring).
HEAP_POLICIES: dict[str, HeapPolicy] = {
    "reuse": HeapPolicy("reuse", (256 << 20, 1 << 30), 8, ceiling=2.0),
    "flat": HeapPolicy("flat", (128 << 10, 128 << 10), 0),
    "trim": HeapPolicy("trim", None, 8),
    "system": HeapPolicy("system", None, 0),
}

#: What this process's thresholds are as far as tilenet knows: None = never set by tilenet.
_current: tuple[int, int] | None = None
_heap_lock = threading.Lock()


def current_heap_settings() -> tuple[int, int] | None:
    """(mmap threshold, trim threshold) that tilenet set and that are in force, or None."""
    return _current


def _set_thresholds(values: tuple[int, int] | None) -> bool:
    """Apply ``values`` (None: glibc's documented defaults); record them. False off glibc."""
    global _current
    libc = _libc()
    _current = values
    if libc is None:
        return False
    mmap_t, trim_t = values if values is not None else _GLIBC_DEFAULT
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_t)))
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_t))) and ok


@contextlib.contextmanager
def heap_policy(name: str) -> Iterator[HeapGuard]:
    """Apply heap policy ``name`` for the block; restore the previous thresholds after it.

    Yields the :class:`HeapGuard` to ``check()`` after each model batch. The free memory the
    block leaves behind is handed back with a final :func:`malloc_trim` (except ``system``).

    >>> before = current_heap_settings()
    >>> with heap_policy("reuse") as guard:
    ...     guard.every
    8
    >>> current_heap_settings() == before
    True
    """
    try:
        policy = HEAP_POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown heap policy {name!r}; choose from {', '.join(HEAP_POLICIES)}"
        ) from None
    with _heap_lock:
        before = _current
        if policy.thresholds is not None:
            _set_thresholds(policy.thresholds)
    guard = HeapGuard(policy.trim_every, ceiling=policy.ceiling)
    try:
        yield guard
    finally:
        with _heap_lock:
            if policy.thresholds is not None:
                _set_thresholds(before)
        if policy.name != "system":
            malloc_trim()  # what the block left free goes back to the OS


def malloc_trim() -> bool:
    """Return the free memory of every glibc arena to the OS (``malloc_trim(0)``).

    Tiled inference frees and reallocates tile-sized buffers (activations, decoded tiles,
    encoded chunks) in several threads. Freed memory that stays mapped is reused (fast), but
    fragments that no later request fits can pile up and grow the peak RSS with the image.
    No-op (returns False) off glibc.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


#: The least working set a ceiling is computed from (a first batch of tiny tiles adds little
#: more than noise to the RSS).
_MIN_WORKING_SET = 64 << 20


def _rss() -> int | None:
    """This process's resident set in bytes (``/proc/self/statm``), or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapGuard:
    """Hand the heap's free fragments back to the OS every ``every`` batches (0: never), and
    go ``flat`` if the RSS passes the ceiling (None: no ceiling).

    Freed memory is reused between trims (fast: no page faults for the next batch's
    activations), and fragments that no later request fits cannot pile up for long.
    ``check()`` after each batch. Measured (docs/benchmarks.md): trimming every batch gives
    back most of what keeping memory gains; trimming on RSS drift instead trimmed after most
    batches wherever batch sizes alternate (crop mode cuts batches at grid rows) and was
    ~30 % slower; every 8 batches kept the speed.

    Trimming does not stop the heap's *address space* from fragmenting, though: glibc puts
    each reused buffer where it fits, a few hundred batches leave the live buffers spread
    over a larger heap, and reusing it makes it resident again. ``ceiling`` caps that: the
    first ``check()`` sets ``ceiling_bytes`` to the RSS when the guard was made plus
    ``ceiling`` times what the first batch added (at least 64 MiB), and a later ``check()``
    that finds the RSS above it sets the ``flat`` thresholds for the rest of the block
    (``went_flat_at`` records the batch). The peak is then at most about the ceiling plus one
    batch's working set: a function of the tile, never of the image.
    """

    def __init__(self, every: int = 8, *, ceiling: float | None = None) -> None:
        self.every = max(0, every)
        self.batches = 0
        self.trims = 0
        self.ceiling = ceiling
        self._base = _rss() if ceiling else None
        #: The RSS cap in bytes, set by the first ``check()`` (None: none).
        self.ceiling_bytes: int | None = None
        #: The batch after which the block went ``flat`` (None: it did not).
        self.went_flat_at: int | None = None

    def check(self) -> None:
        self.batches += 1
        if self.went_flat_at is not None:
            return  # flat returns large buffers itself: nothing is held to trim
        if self.ceiling and self._base is not None:
            rss = _rss()
            if rss is not None:
                if self.ceiling_bytes is None:
                    grew = max(rss - self._base, _MIN_WORKING_SET)
                    self.ceiling_bytes = self._base + int(self.ceiling * grew)
                elif rss > self.ceiling_bytes:
                    self._go_flat(rss)
                    return
        if self.every and self.batches % self.every == 0:
            malloc_trim()
            self.trims += 1

    def _go_flat(self, rss: int) -> None:
        with _heap_lock:
            _set_thresholds(HEAP_POLICIES["flat"].thresholds)
        malloc_trim()
        self.trims += 1
        self.went_flat_at = self.batches
        log.info(
            "heap: %d MB resident after batch %d passed the ceiling of %d MB (the heap kept "
            "for reuse had fragmented); large buffers are returned at once from here on, "
            "as with --heap flat",
            rss >> 20,
            self.batches,
            (self.ceiling_bytes or 0) >> 20,
        )
