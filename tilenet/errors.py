"""Exception hierarchy.

Every error tilenet raises on purpose derives from :class:`TilenetError`. Each subclass also
inherits the matching built-in, so ``except FileNotFoundError`` still works for callers who
do not know tilenet. The CLI turns a :class:`TilenetError` into one line on stderr and the
class's ``exit_code``; messages name the offending file or value and, where there is one, the fix.
:func:`run_guarded` is that guard, shared by ``tilenet`` and ``python -m tilenet.train``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

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
    "OutputBusyError",
    "ShapeMismatchError",
    "TilenetError",
    "UnsupportedFormatError",
    "credentials_scrubbed",
    "first_line",
    "one_line",
    "run_guarded",
    "scrub_credentials",
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


class OutputBusyError(TilenetError, BlockingIOError):
    """Another live run is writing the same output (see :func:`tilenet.io.lock.hold_output`)."""


class ShapeMismatchError(InputError):
    """Two inputs that must agree in size (e.g. image and labels) do not."""


class ModelError(InputError):
    """A model name, its options or its weights are invalid."""


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt or not a tilenet checkpoint."""


_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
_USERINFO = re.compile(rf"({_SCHEME})[^/\s@'\"]+@")
_QUERY = re.compile(rf"({_SCHEME}[^\s?#'\"]+)\?[^\s#'\"]*?(?=:?(?:\s|$)|[#'\"])")


def scrub_credentials(text: str) -> str:
    """``text`` with every URL's ``user:password@`` and query string (presigned tokens) cut,
    as :func:`tilenet.io.storage.redact` cuts them from one URL. The CLI passes every line it
    prints through it, so a message that names a URL as given never shows a secret.

    >>> scrub_credentials("https://ann:pw@host/x.tif?X-Amz-Signature=abc: truncated")
    'https://host/x.tif?...: truncated'
    >>> scrub_credentials("s3://bucket/a.tif: no such object")
    's3://bucket/a.tif: no such object'
    """
    return _QUERY.sub(r"\1?...", _USERINFO.sub(r"\1", text))


def first_line(text: str) -> str:
    """The first line of ``text``, or ``""`` when it has none; the one place a message, a
    CRS's WKT or a library's log record is cut to a line (:func:`one_line` builds on it).

    >>> first_line("PROJCS[...]\\nGEOGCS[...]"), first_line("")
    ('PROJCS[...]', '')
    """
    lines = text.splitlines()
    return lines[0] if lines else ""


def one_line(exc: BaseException, *, typed: bool = True) -> str:
    """The first line of ``exc``'s message, credentials scrubbed (:func:`scrub_credentials`).

    A :class:`TilenetError` already names its file and problem, so its line is kept as is;
    another exception is prefixed by its type (``typed``), because ``KeyError``'s message
    alone is just the key. ``typed=False`` gives the bare line (a reader wrapping a library's
    message in its own), or the type name when the message is empty.

    >>> one_line(KeyError("band"))
    "KeyError: 'band'"
    >>> one_line(InputError("x.tif: no band 4\\nmore detail"))
    'x.tif: no band 4'
    >>> one_line(ValueError("s3://k:pw@b/x.tif: bad\\n"), typed=False)
    's3://b/x.tif: bad'
    >>> one_line(RuntimeError()), one_line(RuntimeError(), typed=False)
    ('RuntimeError', 'RuntimeError')
    """
    first = scrub_credentials(first_line(str(exc).strip()))
    if isinstance(exc, TilenetError) or not typed:
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _ScrubCredentials(logging.Filter):
    """Cut credentials out of a log record's message (see :func:`scrub_credentials`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_credentials(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


@contextlib.contextmanager
def credentials_scrubbed() -> Iterator[None]:
    """For the block, log lines printed by logging's last-resort handler (the CLI's, which
    configures no other) have credentials cut out of any URL they name."""
    handler, scrub = logging.lastResort, _ScrubCredentials()
    if handler is not None:
        handler.addFilter(scrub)
    try:
        yield
    finally:
        if handler is not None:
            handler.removeFilter(scrub)


def run_guarded(fn: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``fn``; turn expected failures into one stderr line and an exit code.

    A closed output pipe ends the run quietly with :data:`EXIT_BROKEN_PIPE`.
    """
    try:
        code = fn()
        sys.stdout.flush()  # a broken pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError as exc:
        broken = [s for s in (sys.stdout, sys.stderr) if _reader_gone(s)]
        if broken:
            _silence(broken)
            return EXIT_BROKEN_PIPE
        if debug:  # a pipe of ours to something else (a worker, a subprocess): a real error
            raise
        print(f"tilenet: error: {scrub_credentials(_os_error_line(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except TilenetError as exc:
        if debug:
            raise
        print(f"tilenet: error: {scrub_credentials(str(exc))}", file=sys.stderr)
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
        print(f"tilenet: error: {scrub_credentials(_os_error_line(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: still one line, the traceback on --debug
        if debug:
            raise
        print(
            f"tilenet: error: unexpected {one_line(exc)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _os_error_line(exc: OSError) -> str:
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}"


def _reader_gone(stream: TextIO | None) -> bool:
    """Whether ``stream`` is a pipe whose reader has gone away."""
    if stream is None:
        return False
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return False  # not a real file (a test's capture)
    if not hasattr(select, "poll"):
        return True  # cannot tell: trust that it was ours, as Python's own recipe does
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    # The write end of a pipe whose reader closed polls as an error (Linux) or a hang-up.
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _silence(streams: list[TextIO]) -> None:
    """Point broken streams at /dev/null (the recipe in Python's ``signal`` docs).

    Their buffers may still hold text that Python flushes at exit; writing it to /dev/null
    keeps that flush from printing "Exception ignored ... BrokenPipeError".
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in streams:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
