"""Progress bars: one policy for every stage.

A bar is drawn only when the caller asks for one (``enabled``, e.g. not ``--quiet``) *and*
someone can watch it: stderr is a terminal, or the code runs in a Jupyter kernel (where tqdm
draws a widget). A bar redrawn with carriage returns is noise in a log file or a CI job, so
there it is disabled and its calls (``update``, ``set_postfix``, ``close``) do nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress_bar", "progress_iter", "show_progress"]

T = TypeVar("T")


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show_progress(enabled: bool = True) -> bool:
    """Whether a bar is drawn: ``enabled`` and stderr is a terminal (or a notebook)."""
    if not enabled:
        return False
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        tty = False
    return tty or _in_notebook()


def progress_bar(
    total: int | None = None,
    *,
    desc: str,
    unit: str,
    enabled: bool = True,
    initial: int = 0,
) -> Any:
    """A tqdm bar (``update``, ``set_postfix``, ``write``, ``close``) under the policy above.

    Where it is not shown it is a disabled tqdm: the same calls, no output.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        disable=not show_progress(enabled),
    )


def progress_iter(
    iterable: Iterable[T],
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """``iterable`` with a bar while it is consumed (the plain iterable when none is shown)."""
    if not show_progress(enabled):
        yield from iterable
        return
    with progress_bar(total, desc=desc, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
