"""Checksums of every output of ``tilenet infer`` for one checkpoint on three kinds of input,
to prove a refactor leaves outputs bit-identical.

Inputs made here, deterministically: a plain tiled TIFF (the demo's synthetic tissue), an
Aperio-layout pyramid SVS of the same pixels (JPEG tiles, read at 1 µm/px through its
pyramid) and a georeferenced GeoTIFF (rasterio, EPSG:32631). Every ``--outputs`` value is
written; each output file's SHA-256 is recorded (``summary.json`` and ``config.yaml`` by their
stable fields only, since they hold paths and timings).

    python scripts/output_checksums.py --model tilenet-demo/run/best.pt --json before.json
    python scripts/output_checksums.py --model tilenet-demo/run/best.pt --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

OUTPUTS = "probabilities,classes,instances,preview,geojson,regions,probabilities_tif"
SUMMARY_KEYS = ("class_names", "class_area_px", "shape", "tiles", "tiles_run", "mode", "halo")


def _inputs(d: Path) -> dict[str, tuple[Path, list[str]]]:
    import rasterio
    import tifffile
    from rasterio.transform import from_origin

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from slidewriters import write_aperio_svs

    from tilenet.geometry import Window

    try:
        from tilenet.patches.synth import render
    except ImportError:  # before the folder move
        from tilenet.patches.synth import render  # type: ignore[no-redef]

    img = render(Window(0, 0, 700, 900), seed=3)[0]
    plain = d / "plain.tif"
    tifffile.imwrite(plain, img, tile=(256, 256), compression="zlib", photometric="rgb")
    svs = write_aperio_svs(d / "slide.svs", np.ascontiguousarray(img), mpp=0.5, levels=(2, 4))
    geo = d / "geo.tif"
    with rasterio.open(
        geo, "w", driver="GTiff", height=img.shape[0], width=img.shape[1], count=3,
        dtype="uint8", crs="EPSG:32631", transform=from_origin(500000, 5000000, 0.5, 0.5),
        tiled=True, blockxsize=256, blockysize=256,
    ) as ds:  # fmt: skip
        ds.write(np.moveaxis(img, -1, 0))
    return {
        "plain": (plain, []),
        "slide": (svs, ["--mpp", "1.0"]),
        "geo": (geo, []),
    }


def _digest(path: Path) -> str:
    if path.name == "summary.json":
        s = json.loads(path.read_text())
        stable = {k: s.get(k) for k in SUMMARY_KEYS}
        return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
    if path.name == "config.yaml":
        return "-"
    if path.name.endswith(".ome.tif"):  # holds a fresh UUID and a date: its pixels and tags
        import tifffile

        h = hashlib.sha256()
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                h.update(page.asarray().tobytes())
                h.update(
                    repr(
                        sorted(
                            (t.name, str(t.value))
                            for t in page.tags.values()
                            if t.name not in ("ImageDescription",)
                        )
                    ).encode()
                )
        return h.hexdigest()
    if path.suffix == ".gpkg":  # holds timestamps: its features and CRS
        import pyogrio

        h = hashlib.sha256()
        for layer in pyogrio.list_layers(path)[:, 0]:
            meta, _, geom, fields = pyogrio.raw.read(path, layer=layer)
            h.update(repr(meta.get("crs")).encode() + bytes(b"".join(geom)))
            for f in fields:
                h.update(repr(list(f)).encode())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(model: Path, workdir: Path) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for name, (img, extra) in _inputs(workdir).items():
        out = workdir / f"out-{name}"
        cmd = [sys.executable, "-m", "tilenet", "infer", str(img), "--model", str(model)]
        cmd += ["--out", str(out), "--outputs", OUTPUTS, "--quiet", *extra]
        subprocess.run(cmd, check=True)
        files = sorted(p for p in out.rglob("*") if p.is_file() and ".tilenet" not in p.parts)
        result[name] = {str(p.relative_to(out)): _digest(p) for p in files}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--json", type=Path, help="write the checksums here")
    ap.add_argument("--compare", type=Path, help="compare with checksums written before")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        now = run(args.model.resolve(), Path(d))
    if args.json:
        args.json.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    same = differ = 0
    if args.compare:
        before: dict[str, Any] = json.loads(args.compare.read_text())
        for name in sorted(set(before) | set(now)):
            b, n = before.get(name, {}), now.get(name, {})
            for f in sorted(set(b) | set(n)):
                if b.get(f) == n.get(f):
                    same += 1
                else:
                    differ += 1
                    print(f"DIFFERS {name}/{f}: {b.get(f)} -> {n.get(f)}")
    files = sum(len(v) for v in now.values())
    print(f"output_checksums: {files} files over {len(now)} inputs; same {same}, differ {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
