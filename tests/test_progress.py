"""The progress policy: a bar only when asked for and stderr is a terminal."""

from __future__ import annotations

import io

import pytest

from tilenet.progress import progress_bar, progress_iter, show_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("tty", "enabled", "shown"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_bar_only_on_a_terminal_when_enabled(
    monkeypatch: pytest.MonkeyPatch, tty: bool, enabled: bool, shown: bool
) -> None:
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert show_progress(enabled) is shown
    bar = progress_bar(5, desc="work", unit="item", enabled=enabled)
    bar.update(5)
    bar.set_postfix(loss="0.1")
    bar.close()
    assert ("work" in err.getvalue()) is shown
    assert list(progress_iter(range(4), desc="it", unit="x", total=4, enabled=enabled)) == [
        0,
        1,
        2,
        3,
    ]
    assert ("it: 100%" in err.getvalue()) is shown
