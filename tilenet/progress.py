"""Progress bars: one policy for every stage (placeholder until the concepts branch lands)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, *, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
