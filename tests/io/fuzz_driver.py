"""Runs ``tilenet info`` and ``tilenet convert`` on each file named on stdin (after the
unmutated seed files named as arguments, untimed), in this one
process (an interpreter start per mutant would cost a second each), and prints one JSON line
per run: the exit code, the stderr lines, the seconds taken. Before each run it prints
``BEGIN <path>``, so a hang or a crash of the process names the mutant it was on.

Address space is capped (``--max-gb``), so a crafted header that makes a reader allocate what
it claims shows up as "out of memory" instead of taking the machine down.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    max_gb = float(sys.argv[1])
    out_dir = Path(sys.argv[2])
    cap = int(max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from tilenet.cli import main as tilenet_main

    # the unmutated seeds first, untimed and unreported: they pay for each reader's lazy imports
    warm = sys.argv[3:]
    paths = [ln.strip() for ln in sys.stdin if ln.strip()]
    for i, path in enumerate([*warm, *paths]):
        for cmd in ("info", "convert"):
            target = out_dir / (Path(path).name + ".ome.tif")
            argv = [cmd, path] if cmd == "info" else [cmd, path, str(target), "--tile", "64"]
            print(f"BEGIN {cmd} {path}", flush=True)
            err, out = io.StringIO(), io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    code = tilenet_main(argv)
                except SystemExit as exc:  # argparse
                    code = exc.code if isinstance(exc.code, int) else 2
            seconds = time.perf_counter() - t0
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            target.unlink(missing_ok=True)
            if i < len(warm):
                continue
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            print(json.dumps({"cmd": cmd, "path": path, "code": code, "stderr": lines,
                              "seconds": round(seconds, 3)}), flush=True)  # fmt: skip
    print("END", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
