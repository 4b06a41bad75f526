"""Benchmark window reads from object storage against the same file on local disk.

Starts moto's S3 server on 127.0.0.1 behind a small counting HTTP proxy (it counts GET
requests and the bytes of their response bodies: what the server sent, headers excluded),
uploads a tiled RGB TIFF (512² JPEG tiles) to a bucket, and reads the same random 512x512
windows (unaligned: 4 tiles each) through ``tilenet.io.open_image`` from the local file and
from ``s3://``, with 1 and ``--threads`` threads. Reports windows/s, the bytes fetched per
window (at the server for s3; for the local file, the compressed bytes of the tiles the
windows touch, which is what ``pread`` reads) and the header cost of opening.

    python scripts/bench_s3.py --out docs/bench_s3.json
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from _benchutil import TILE, machine_info, make_tiff, write_json  # scripts/ is on sys.path

WIN = 512


class CountingProxy:
    """Forwards every request to ``upstream``; counts GETs and their response body bytes."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        proxy = self
        self.gets = 0
        self.bytes = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if self.command == "GET":
                    with proxy.lock:
                        proxy.gets += 1
                        proxy.bytes += len(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> tuple[int, int]:
        """(GETs, bytes) since the last call."""
        with self.lock:
            out = (self.gets, self.bytes)
            self.gets = self.bytes = 0
        return out


def _windows(size: int, count: int, seed: int) -> list[Any]:
    from tilenet.geometry import Window

    rng = np.random.default_rng(seed)
    ys = rng.integers(0, size - WIN, count)
    xs = rng.integers(0, size - WIN, count)
    return [Window(int(y), int(x), WIN, WIN) for y, x in zip(ys, xs, strict=True)]


def _tile_bytes(path: Path, windows: list[Any]) -> tuple[int, int]:
    """Compressed bytes of the tiles the windows touch: summed per window (a tile shared by
    two windows counted twice), and over the distinct tiles (each once)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        counts = page.databytecounts
        nx = -(-int(page.imagewidth) // TILE)
        total = 0
        seen: set[int] = set()
        for w in windows:
            for ty in range(w.y // TILE, (w.y1 - 1) // TILE + 1):
                for tx in range(w.x // TILE, (w.x1 - 1) // TILE + 1):
                    total += int(counts[ty * nx + tx])
                    seen.add(ty * nx + tx)
    return total, sum(int(counts[i]) for i in seen)


def measure(
    source: str, windows: list[Any], threads: int, proxy: CountingProxy | None
) -> dict[str, Any]:
    """Open ``source`` (fresh image: cold tile cache) and read ``windows`` with ``threads``."""
    from tilenet.io import open_image

    if proxy:
        proxy.take()
    t0 = time.perf_counter()
    img = open_image(source)
    open_s = time.perf_counter() - t0
    header = proxy.take() if proxy else (0, 0)
    t0 = time.perf_counter()
    with img, ThreadPoolExecutor(threads) as pool:
        list(pool.map(img.read, windows))
    secs = time.perf_counter() - t0
    gets, fetched = proxy.take() if proxy else (0, 0)
    out = {
        "threads": threads,
        "windows": len(windows),
        "seconds": round(secs, 3),
        "windows_per_s": round(len(windows) / secs, 2),
        "open_s": round(open_s, 4),
    }
    if proxy:
        out.update(
            header_gets=header[0],
            header_bytes=header[1],
            gets_per_window=round(gets / len(windows), 2),
            bytes_per_window=round(fetched / len(windows)),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=8192, help="image side in pixels")
    ap.add_argument("--windows", type=int, default=64, help="random 512² windows per run")
    ap.add_argument("--threads", type=int, default=4, help="reader threads of the second run")
    ap.add_argument("--quick", action="store_true", help="2048² image, 8 windows (smoke test)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    side, count = (2048, 8) if args.quick else (args.side, args.windows)

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = CountingProxy(f"http://{host}:{port}")
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=proxy.url,
    )
    from tilenet.io.storage import upload

    results: dict[str, Any] = {"machine": machine_info(), "side": side, "tile": TILE}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_tiff(Path(tmp) / "bench.tif", side, compression="jpeg")
            boto3.client("s3", endpoint_url=proxy.url).create_bucket(Bucket="bench")
            upload(path, "s3://bench/bench.tif")
            windows = _windows(side, count, seed=0)
            results["file_bytes"] = path.stat().st_size
            per_window, distinct = _tile_bytes(path, windows)
            results["tile_bytes_per_window"] = round(per_window / count)
            results["distinct_tile_bytes"] = distinct
            runs = []
            for threads in sorted({1, args.threads}):
                for where, src in (("local", str(path)), ("s3", "s3://bench/bench.tif")):
                    r = measure(src, windows, threads, proxy if where == "s3" else None)
                    runs.append({"source": where, **r})
            results["runs"] = runs
    finally:
        proxy.server.shutdown()
        server.stop()
    by = {(r["source"], r["threads"]): r for r in results["runs"]}
    t = args.threads
    s3, local = by[("s3", t)], by[("local", t)]
    results["s3_vs_local_speed"] = round(s3["windows_per_s"] / local["windows_per_s"], 3)
    # Each distinct tile is fetched once per open image (the decoded-tile cache serves the
    # tiles that windows share), so the fetched total is compared with the distinct tiles.
    results["s3_bytes_over_distinct_tiles"] = round(
        s3["bytes_per_window"] * count / results["distinct_tile_bytes"], 3
    )
    results["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.out:
        write_json(args.out, results)
    print(
        f"{side}² jpeg, {count} windows of 512², {t} threads: local "
        f"{local['windows_per_s']} win/s, s3 {s3['windows_per_s']} win/s "
        f"({results['s3_vs_local_speed']}x); s3 fetched {s3['bytes_per_window']:,} B/window, "
        f"{results['s3_bytes_over_distinct_tiles']}x the distinct tiles' bytes (windows' tiles "
        f"{results['tile_bytes_per_window']:,} B/window, file {results['file_bytes']:,} B); "
        f"load {results['machine'].get('loadavg_start')} -> {results['loadavg_end']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
