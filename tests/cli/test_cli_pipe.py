"""A closed output pipe (``tilenet info x.tif | head -1``) ends the run quietly, as in Unix tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tilenet.errors import EXIT_BROKEN_PIPE, EXIT_USAGE, run_guarded


def _run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ARGS`` with stdout a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the child starts: its first write to stdout fails with EPIPE
    try:
        return subprocess.run(
            [sys.executable, "-m", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.fixture
def tiff(tmp_path: Path) -> Path:
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    return path


@pytest.mark.parametrize("json_flag", [[], pytest.param(["--json"], marks=pytest.mark.slow)])
def test_info_into_closed_pipe_is_quiet(tiff: Path, json_flag: list[str]) -> None:
    proc = _run_into_closed_pipe(["tilenet", "info", str(tiff), *json_flag])
    assert proc.stderr == ""
    assert proc.returncode == EXIT_BROKEN_PIPE == 141


@pytest.mark.slow  # ~12 s (imports torch); default: info into a closed pipe
def test_train_print_config_into_closed_pipe_is_quiet() -> None:
    proc = _run_into_closed_pipe(["tilenet.train", "--print-config"])
    assert proc.stderr == ""
    assert proc.returncode == EXIT_BROKEN_PIPE


def test_info_into_open_pipe_still_prints(tiff: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tilenet", "info", str(tiff)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"path:        {tiff}")


def test_a_broken_pipe_elsewhere_is_still_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Only our own closed output ends quietly: a pipe to a worker that breaks is reported."""

    def run() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    assert run_guarded(run) == EXIT_USAGE
    assert capsys.readouterr().err == "tilenet: error: Broken pipe\n"
    with pytest.raises(BrokenPipeError):
        run_guarded(run, debug=True)
