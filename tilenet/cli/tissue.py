"""``tilenet tissue``: tissue masks, overlays and QuPath polygons of slides (tilenet.tissue)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tilenet.errors import EXIT_OK, EXIT_PARTIAL, one_line, scrub_credentials

__all__ = ["add_tissue"]

#: What one image's folder holds (``OUT/<stem>/``); ``tissue.json`` is written last.
FILES = ("mask.ome.zarr", "overlay.png", "tissue.geojson", "tissue.json")

_EPILOG = """\
method (tilenet.tissue, the CLAM recipe with its known failures fixed): a thumbnail at
--mask-mpp µm/px from the coarsest pyramid level at least that fine (never level 0 where the
slide has a pyramid); HSV saturation; Otsu's threshold, lowered to the glass's own spread so
that pale tissue stays; a median filter; closing; pieces under --min-tissue-um2 dropped,
holes under --min-hole-um2 filled. Pen marks (green to blue hues) and dark pixels (black
ink, scanner borders) are not tissue.

per image, OUT/<stem>/:
  mask.ome.zarr   the mask (uint8 0/1), OME-Zarr with its pixel size: opens in napari/QuPath
  overlay.png     the thumbnail, tissue tinted green with its outline
  tissue.geojson  one QuPath annotation per tissue piece ("Tissue"), level-0 pixels
  tissue.json     parameters, the thresholds chosen, tissue fraction and area

examples:
  tilenet tissue slides/ --out tissue/
  tilenet tissue scan.svs --out tissue/ --min-tissue-um2 2000 --mask-mpp 4
  tilenet tile slides/ --tissue --out p.zarr      # patches only on tissue (same method)
"""


def add_tissue(sub: Any) -> None:
    from tilenet.tissue import DEFAULT_MPP

    p = sub.add_parser(
        "tissue",
        help="find the tissue on slides: mask, overlay and QuPath polygons per image",
        description=(
            "Detect tissue on a low-resolution thumbnail of each image and write its mask,\n"
            "an overlay PNG and the tissue polygons. Parameters are physical (µm, µm²), so\n"
            "one setting fits slides scanned at any magnification. An image already done is\n"
            "skipped (--force redoes it); an unreadable one is reported and the others go on\n"
            "(exit 1)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, directories, globs")
    p.add_argument("--out", required=True, help="output folder (or bucket prefix s3://B/p)")
    p.add_argument(
        "--mask-mpp",
        type=float,
        default=DEFAULT_MPP,
        metavar="UM",
        help=f"µm per pixel of the thumbnail tissue is found on (default {DEFAULT_MPP:g})",
    )
    p.add_argument(
        "--min-tissue-um2",
        type=float,
        default=10_000.0,
        metavar="UM2",
        help="drop tissue pieces smaller than this, µm² (default 10000: 0.01 mm²)",
    )
    p.add_argument(
        "--min-hole-um2",
        type=float,
        default=20_000.0,
        metavar="UM2",
        help="fill holes smaller than this, µm² (default 20000); larger ones stay holes",
    )
    p.add_argument(
        "--level0-mpp",
        type=float,
        metavar="UM",
        help="the level-0 pixel size (µm) of images whose file states none (default: 0.5, "
        "with a warning)",
    )
    p.add_argument("--force", action="store_true", help="redo images already done")
    p.set_defaults(handler=_cmd_tissue)


def _cmd_tissue(args: argparse.Namespace) -> int:
    from tilenet.io.location import location
    from tilenet.io.paths import resolve_images

    out = location(args.out)
    failed = 0
    for path in resolve_images(args.images):
        try:
            line = write_tissue(path, out, args)
        except Exception as exc:  # one image's failure does not stop the batch
            failed += 1
            line = f"failed: {one_line(exc)}"
        print(scrub_credentials(f"{path}: {line}"))
    return EXIT_PARTIAL if failed else EXIT_OK


def write_tissue(path: Path | str, out: Any, args: argparse.Namespace) -> str:
    """Detect the tissue of ``path`` and publish ``out/<stem>/`` (built under a temporary
    name, renamed or uploaded when whole); a one-line summary."""
    from tilenet.fsutil import safe_stem
    from tilenet.io import open_image
    from tilenet.tissue import detect_tissue

    stem = safe_stem(str(path))
    if not args.force and out.exists(f"{stem}/tissue.json"):
        return f"done already ({out.join(stem)}; --force redoes it)"
    with open_image(path) as img:
        mask = detect_tissue(
            img,
            mpp=args.mask_mpp,
            level0_mpp=args.level0_mpp,
            min_tissue_um2=args.min_tissue_um2,
            min_hole_um2=args.min_hole_um2,
            keep_thumbnail=True,
        )
    with out.local_file(stem) as folder:
        folder.mkdir(parents=True, exist_ok=True)
        _write_mask(folder / FILES[0], mask)
        _write_overlay(folder / FILES[1], mask)
        pieces = _write_polygons(folder / FILES[2], mask)
        record = {"input": scrub_credentials(str(path)), "pieces": pieces, **mask.describe()}
        (folder / FILES[3]).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    pct = 100 * mask.tissue_fraction
    return f"{pct:.1f} % tissue, {pieces} piece(s) -> {out.join(stem)}"


def _write_mask(path: Path, mask: Any) -> None:
    import zarr

    from tilenet.io.omezarr import OmeZarrWriter

    data = mask.mask.astype("uint8")
    with OmeZarrWriter(
        path,
        shape=data.shape,
        dtype="uint8",
        chunks=1024,
        pixel_size=None if mask.mpp_assumed else mask.mpp,
        name="tissue",
    ) as w:
        w.write(0, 0, data)
        w.finalize(method="mode")
    group = zarr.open_group(path, mode="r+", zarr_format=2)
    # level-0 pixels per mask pixel: how the mask lies on the slide, whatever its pixel size
    group.attrs["tilenet:tissue"] = {"scale_to_level0": list(mask.scale), **mask.params}


def _write_overlay(path: Path, mask: Any) -> None:
    import numpy as np
    from PIL import Image
    from scipy import ndimage as ndi

    rgb = mask.thumbnail.astype(np.float32)
    m = mask.mask
    green = np.array([40, 170, 60], np.float32)
    rgb[m] = 0.7 * rgb[m] + 0.3 * green
    rgb[m & ~ndi.binary_erosion(m)] = (0, 110, 30)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _write_polygons(path: Path, mask: Any) -> int:
    """QuPath annotations, one per tissue piece (level-0 pixels:
    :func:`tilenet.outputs.polygons.mask_polygons`); how many."""
    from tilenet.outputs.polygons import GeoJSONStream, mask_polygons

    n = 0
    with GeoJSONStream(path) as out:
        for rings in mask_polygons(mask.mask, mask.scale, mask.shape):
            n += 1
            out.write(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": "Tissue", "color": [40, 170, 60]},
                    },
                }
            )
    return n
