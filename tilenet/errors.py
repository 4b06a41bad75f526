"""Exception hierarchy.

Every error tilenet raises on purpose derives from :class:`TilenetError`. Each subclass also
inherits the matching built-in, so ``except FileNotFoundError`` still works for callers who
do not know tilenet. The CLI turns a :class:`TilenetError` into one line on stderr and the
class's ``exit_code``; messages name the offending file or value and, where there is one, the fix.
:func:`run_guarded` is that guard, shared by ``tilenet`` and ``python -m tilenet.train``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "CheckpointError",
    "ConfigError",
    "CorruptImageError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "InputError",
    "ModelError",
    "ShapeMismatchError",
    "TilenetError",
    "UnsupportedFormatError",
    "run_guarded",
]

#: Exit codes shared by every command.
EXIT_OK = 0
EXIT_PARTIAL = 1  # some items of a batch failed
EXIT_USAGE = 2  # bad input or usage
#: The reader of our output went away (``tilenet info x.tif | head -1``). A Unix tool is
#: killed by SIGPIPE there, which a shell reports as 128 + 13; we exit with the same status,
#: quietly, instead of dying by the signal (dask's sockets need SIGPIPE ignored). Not 1, which
#: means "some items of a batch failed".
EXIT_BROKEN_PIPE = 141


class TilenetError(Exception):
    """Root of every error tilenet raises on purpose."""

    exit_code = EXIT_USAGE


class InputError(TilenetError, ValueError):
    """Bad user input: a value, a path or an option that cannot work."""


class ConfigError(InputError):
    """A configuration key or value is invalid."""


class ImageNotFoundError(TilenetError, FileNotFoundError):
    """An input path does not exist, or is not a file/store."""


class UnsupportedFormatError(InputError):
    """The file exists but is not an image tilenet can read (or a layout it cannot read)."""


class CorruptImageError(InputError):
    """The file claims to be a supported image but its content is broken."""


class ImageTooLargeError(InputError):
    """An image is too large for a non-lazy reader, or claims an absurd size."""


class ShapeMismatchError(InputError):
    """Two inputs that must agree in size (e.g. image and labels) do not."""


class ModelError(InputError):
    """A model name, its options or its weights are invalid."""


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt or not a tilenet checkpoint."""


def run_guarded(fn: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``fn``; turn expected failures into one stderr line and an exit code.

    A closed output pipe ends the run quietly with :data:`EXIT_BROKEN_PIPE`.
    """
    try:
        code = fn()
        sys.stdout.flush()  # a broken pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_broken_pipes()
        return EXIT_BROKEN_PIPE
    except TilenetError as exc:
        if debug:
            raise
        print(f"tilenet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tilenet: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("tilenet: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"tilenet: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: still one line, the traceback on --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"tilenet: error: unexpected {type(exc).__name__}: {first} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _silence_broken_pipes() -> None:
    """Point a broken stdout/stderr at /dev/null (the recipe in Python's ``signal`` docs).

    Their buffers still hold unwritten text that Python flushes at exit; writing it to
    /dev/null keeps that flush from printing "Exception ignored ... BrokenPipeError".
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
