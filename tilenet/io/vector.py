"""Vector labels: polygons rasterized into label images, one window at a time.

Two sources, one machinery:

* **QuPath annotations** (``kind="annotations"``): QuPath's GeoJSON export (a
  FeatureCollection, a Feature, or the bare list of features QuPath writes), or plain GeoJSON
  polygons with a class property. Coordinates are the file's level-0 pixels, as QuPath's are.
  The class is ``properties.classification.name`` (QuPath), else ``properties.class`` or
  ``properties.label``, or the property ``label_field`` names.
* **Vector files** (``kind="vector"``): anything GDAL/OGR reads through pyogrio (GeoPackage,
  Shapefile, GeoJSON, FlatGeobuf, ...) in any CRS, the class in the field ``label_field``.
  Only the features inside a raster's bounds are read, and they are reprojected to the
  raster's CRS.

Polygons with holes and MultiPolygons are kept; invalid polygons are repaired with
``shapely.make_valid`` (with a warning); other geometries are skipped (with a warning).

:meth:`VectorLabels.for_image` gives a :class:`VectorLabelImage`: a one-channel uint8
:class:`~tilenet.io.base.LazyImage` with the image's pyramid. A read rasterizes, with
``rasterio.features.rasterize`` (GDAL, pixel-centre rule), only the polygons an STRtree
finds in the window, in fixed 256² blocks of a global grid through
``image.pixel_transform(level)`` (:mod:`tilenet.io.labelimage`): a pixel's label is computed the same way whichever window
it is read in, and never for the whole image at once. Pixels outside every polygon get
:data:`IGNORE_INDEX` (``outside="ignore"``, the training loss skips them) or 0
(``outside="background"``). Polygons later in the file are drawn over earlier ones.

Class names are those the files use, sorted (with ``outside="background"``, class 0 is
``"background"``), or come from a class map ``name -> index``; a name the map lacks is an
error that lists the known ones. shapely, pyogrio and rasterio are imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tilenet.errors import ImageNotFoundError, InputError, UnsupportedFormatError, one_line
from tilenet.geometry import GeoTransform
from tilenet.io.base import IGNORE_INDEX, LazyImage
from tilenet.io.classes import OUTSIDE, Outside, name_key, resolve_classes
from tilenet.io.crs import display_name
from tilenet.io.crs import parse as parse_crs
from tilenet.io.labelimage import VectorLabelImage
from tilenet.io.paths import match_by_stem

__all__ = [
    "ANNOTATION_SUFFIXES",
    "OUTSIDE",
    "VectorLabelImage",
    "VectorLabelPlan",
    "VectorLabels",
    "match_annotations",
    "plan_vector_labels",
    "read_annotations",
    "read_class_names",
    "read_vector_labels",
    "resolve_classes",
]

#: File endings of annotation files found in a directory.
ANNOTATION_SUFFIXES = (".geojson", ".json")

Kind = Literal["annotations", "vector"]

_DEFAULT_FIELDS = ("classification", "class", "label")
#: GeoJSON geometry types that can hold an area (a label); lines and points cannot.
_AREAL = ("Polygon", "MultiPolygon", "GeometryCollection")
_GEOMETRY_TYPES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
}


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _class_of(props: Any, fields: Sequence[str]) -> str | None:
    if not isinstance(props, dict):
        return None
    for f in fields:
        v = props.get(f)
        if isinstance(v, dict):  # QuPath: {"name": "Tumor", "color": [...]}
            v = v.get("name")
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # a numeric field read as float: 2.0 names class "2"
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return str(v)
    return None


# -- reading -------------------------------------------------------------------------------
def _geojson_features(path: Path) -> list[dict[str, Any]]:
    """The features of a GeoJSON file (FeatureCollection, Feature, geometry, or a list)."""
    if not path.is_file():
        raise ImageNotFoundError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedFormatError(
            f"{path}: not GeoJSON ({one_line(exc, typed=False)})"
        ) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, dict) and data.get("type") in _GEOMETRY_TYPES:
        feats = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):  # QuPath's "export as FeatureCollection: no"
        feats = data
    else:
        raise UnsupportedFormatError(
            f"{path}: not GeoJSON (expected a FeatureCollection, a Feature or a list of "
            "features, as QuPath exports)"
        )
    if not isinstance(feats, list) or not all(
        isinstance(f, dict) and f.get("type") == "Feature" for f in feats
    ):
        raise UnsupportedFormatError(f"{path}: not GeoJSON (its features are not all Features)")
    return feats


def _fields_for(label_field: str | None) -> tuple[str, ...]:
    return (label_field,) if label_field else _DEFAULT_FIELDS


def _annotation_names(
    feats: list[dict[str, Any]], path: Path, label_field: str | None
) -> list[str | None]:
    fields = _fields_for(label_field)
    names = [_class_of(f.get("properties"), fields) for f in feats]
    if feats and all(n is None for n in names):
        keys = sorted(
            {k for f in feats if isinstance(f.get("properties"), dict) for k in f["properties"]}
        )
        raise InputError(
            f"{path}: no feature has a class property ({', '.join(fields)}); its properties: "
            f"{', '.join(keys) or 'none'}; name the class property with --label-field"
        )
    return names


def _ogr_info(path: Path) -> dict[str, Any]:
    import pyogrio

    if not path.exists():
        raise ImageNotFoundError(f"{path}: vector file not found")
    try:
        info = pyogrio.read_info(path)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"{path}: not a vector file GDAL/OGR reads ({one_line(exc, typed=False)})"
        ) from None
    if not info.get("geometry_type"):
        raise UnsupportedFormatError(f"{path}: holds no geometries (not vector data)")
    return info


def _check_field(path: Path, info: dict[str, Any], label_field: str | None) -> str:
    fields = [str(f) for f in info.get("fields", [])]
    if not label_field:
        raise InputError(
            f"{path}: give the field that holds the class (--label-field); fields: "
            f"{', '.join(fields) or 'none'}"
        )
    if label_field not in fields:
        raise InputError(
            f"{path}: has no field {label_field!r}; fields: {', '.join(fields) or 'none'}"
        )
    return label_field


def read_class_names(
    path: str | Path, *, kind: Kind = "annotations", label_field: str | None = None
) -> set[str]:
    """The class names of the polygons in an annotation or vector file: the classes of
    lines and points (QuPath measurement lines, cell centroids), which are never labels,
    get no class index."""
    p = Path(path)
    if kind == "annotations":
        feats = _geojson_features(p)
        names = _annotation_names(feats, p, label_field)
        kinds = [(f.get("geometry") or {}).get("type") for f in feats]
        return {n for n, k in zip(names, kinds, strict=True) if n is not None and k in _AREAL}
    import pyogrio.raw
    import shapely

    fld = _check_field(p, _ogr_info(p), label_field)
    try:
        _, _, wkb, data = pyogrio.raw.read(p, columns=[fld])
    except Exception as exc:
        raise UnsupportedFormatError(
            f"{p}: cannot read field {fld!r} ({one_line(exc, typed=False)})"
        ) from None
    types = shapely.get_type_id(shapely.from_wkb(wkb, on_invalid="ignore"))
    return {
        n
        for n, t in zip((_class_of({fld: v}, (fld,)) for v in data[0]), types, strict=True)
        if n is not None and t in (3, 6, 7)
    }


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry (a Polygon, a MultiPolygon, or None)."""
    import shapely

    parts = [g for g in shapely.get_parts(geom) if g is not None]
    polys: list[Any] = []
    for g in parts:
        t = shapely.get_type_id(g)
        if t == 3:
            polys.append(g)
        elif t in (6, 7):
            sub = _polygonal(g)
            if sub is not None:
                polys.extend(shapely.get_parts(sub))
    polys = [p for p in polys if not p.is_empty]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def _clean(geoms: list[Any], names: list[str | None], path: Path) -> tuple[list[Any], list[str]]:
    """Polygons only (repaired where invalid), with their class names; warnings say what went."""
    import shapely

    out_g: list[Any] = []
    out_n: list[str] = []
    skipped: dict[str, int] = {}
    unclassified = 0
    repaired: list[str] = []
    for g, n in zip(geoms, names, strict=True):
        kind = "no geometry" if g is None else g.geom_type
        if g is None or shapely.get_type_id(g) not in (3, 6, 7):
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if n is None:
            unclassified += 1
            continue
        g = shapely.force_2d(g)
        if not shapely.is_valid(g):
            repaired.append(shapely.is_valid_reason(g))
            g = shapely.make_valid(g)
        poly = _polygonal(g)
        if poly is None:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        out_g.append(poly)
        out_n.append(n)
    if repaired:
        _warn(
            f"{path}: repaired {len(repaired)} invalid polygon(s) with shapely.make_valid "
            f"(first: {repaired[0]})"
        )
    if skipped:
        what = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
        _warn(f"{path}: skipped {sum(skipped.values())} non-polygon feature(s) ({what})")
    if unclassified:
        _warn(f"{path}: skipped {unclassified} polygon(s) without a class")
    return out_g, out_n


def read_annotations(path: str | Path, *, label_field: str | None = None) -> VectorLabels:
    """Polygons of a QuPath GeoJSON export (or plain GeoJSON), in level-0 pixel coordinates."""
    import shapely.geometry

    p = Path(path)
    feats = _geojson_features(p)
    names = _annotation_names(feats, p, label_field)
    geoms: list[Any] = []
    for i, f in enumerate(feats):
        g = f.get("geometry")
        if g is None:
            geoms.append(None)
            continue
        try:
            geoms.append(shapely.geometry.shape(g))
        except Exception as exc:
            raise InputError(
                f"{p}: feature {i} has a broken geometry ({one_line(exc, typed=False)})"
            ) from None
    kept, kept_names = _clean(geoms, names, p)
    return VectorLabels(p, np.array(kept, dtype=object), kept_names, "annotations", None)


def _transform_xy(src: Any, dst: Any, xy: np.ndarray, what: str) -> np.ndarray:
    from rasterio.warp import transform

    try:
        xs, ys = transform(src, dst, xy[:, 0], xy[:, 1])
    except Exception as exc:
        raise InputError(
            f"{what}: cannot transform coordinates from {display_name(src)} to {display_name(dst)} "
            f"({one_line(exc, typed=False)})"
        ) from None
    out = np.column_stack([np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)])
    if out.size and not np.isfinite(out).all():
        raise InputError(
            f"{what}: cannot transform coordinates from {display_name(src)} to {display_name(dst)} "
            "(the transformation gives non-finite values)"
        )
    return out


def read_vector_labels(
    path: str | Path, *, label_field: str | None, image: LazyImage | None = None
) -> VectorLabels:
    """Polygons of a vector file, with the class from ``label_field``.

    With ``image`` (georeferenced), only features within its bounds are read, and the result
    is already in the image's CRS. A raster without a CRS given labels in a CRS, or CRSs that
    cannot be transformed, are one-line errors.
    """
    import pyogrio.raw
    import shapely

    p = Path(path)
    info = _ogr_info(p)
    fld = _check_field(p, info, label_field)
    src_crs = parse_crs(info["crs"], str(p)) if info.get("crs") else None
    bbox = None
    if image is not None and src_crs is not None:
        if image.crs is None:
            raise InputError(
                f"{image.path}: has no CRS, but the vector labels {p} are in "
                f"{display_name(src_crs)}; georeference the raster, or give labels without a CRS"
            )
        dst = parse_crs(image.crs, str(image.path))
        corners = _extent_corners(image)
        if dst != src_crs:
            from rasterio.warp import transform_bounds

            xs, ys = corners[:, 0], corners[:, 1]
            try:
                bbox = transform_bounds(dst, src_crs, xs.min(), ys.min(), xs.max(), ys.max())
            except Exception as exc:
                raise InputError(
                    f"{p}: cannot transform coordinates from {display_name(src_crs)} to "
                    f"{display_name(dst)} ({one_line(exc, typed=False)})"
                ) from None
            if not np.isfinite(bbox).all():
                raise InputError(
                    f"{p}: cannot transform coordinates from {display_name(src_crs)} to "
                    f"{display_name(dst)} (non-finite bounds)"
                )
        else:
            bbox = (
                corners[:, 0].min(),
                corners[:, 1].min(),
                corners[:, 0].max(),
                corners[:, 1].max(),
            )
    try:
        _, _, wkb, data = pyogrio.raw.read(p, columns=[fld], bbox=bbox)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"{p}: cannot read features ({one_line(exc, typed=False)})"
        ) from None
    geoms = list(shapely.from_wkb(wkb)) if wkb is not None else []
    names = [_class_of({fld: v}, (fld,)) for v in data[0]] if len(data) else []
    kept, kept_names = _clean(geoms, names, p)
    labels = VectorLabels(
        p, np.array(kept, dtype=object), kept_names, "vector", src_crs.to_wkt() if src_crs else None
    )
    if image is not None:
        labels = labels.to_crs(image)
    return labels


def match_annotations(images: Sequence[Path | str], spec: str | os.PathLike[str]) -> list[Path]:
    """The annotation file of each image (:func:`~tilenet.io.paths.match_by_stem`): ``spec``
    is a file (one image), a directory (a ``.geojson``/``.json`` file with the image's stem),
    a glob, or a pattern with ``{stem}``.

    QuPath names exports after the image, with or without its extension (``a.svs.geojson``
    and ``a.geojson`` both match ``a.svs``).
    """
    return match_by_stem(images, spec, suffixes=ANNOTATION_SUFFIXES, what="annotation file")


# -- geometry helpers ----------------------------------------------------------------------
def _extent_corners(image: LazyImage) -> np.ndarray:
    """The corners (4, 2) of level 0 in reference coordinates."""
    h, w = image.levels[0].shape
    cols = np.array([0, w, w, 0], dtype=np.float64)
    rows = np.array([0, 0, h, h], dtype=np.float64)
    return np.column_stack(image.pixel_transform(0)(cols, rows))


# -- polygons and label images -------------------------------------------------------------
@dataclass
class VectorLabels:
    """Polygons with class names from one file, in one frame.

    ``crs`` is None for pixel coordinates (QuPath: the file's level-0 pixels; or a vector file
    without a CRS), else the CRS as WKT.
    """

    path: Path
    geoms: np.ndarray
    names: list[str]
    kind: Kind = "annotations"
    crs: str | None = None

    @property
    def class_names(self) -> list[str]:
        """The class names used, sorted (numbers by value)."""
        return sorted(set(self.names), key=name_key)

    def to_crs(self, image: LazyImage) -> VectorLabels:
        """These polygons in ``image``'s reference frame (its CRS, or its level-0 pixels)."""
        import shapely

        if self.crs is None:
            if self.kind == "annotations" and image.transform is not None:
                # QuPath pixels of a georeferenced raster: through its level-0 geotransform.
                ry, rx = image.reference_scale
                gt = GeoTransform(*image.transform).scaled((1 / ry, 1 / rx))

                def fn(xy: np.ndarray) -> np.ndarray:
                    return np.column_stack(gt(xy[:, 0], xy[:, 1]))

                return VectorLabels(
                    self.path, shapely.transform(self.geoms, fn), self.names, self.kind, image.crs
                )
            if image.crs is not None:
                _warn(
                    f"{self.path}: has no CRS; its coordinates are taken to be in the CRS of "
                    f"{image.path}"
                )
            return self
        if image.crs is None:
            raise InputError(
                f"{image.path}: has no CRS, but the labels {self.path} are in "
                f"{display_name(parse_crs(self.crs, str(self.path)))}; georeference the raster, or "
                "give labels without a CRS"
            )
        src = parse_crs(self.crs, str(self.path))
        dst = parse_crs(image.crs, str(image.path))
        if src == dst or not len(self.geoms):
            return VectorLabels(self.path, self.geoms, self.names, self.kind, image.crs)
        what = str(self.path)
        geoms = shapely.transform(self.geoms, lambda xy: _transform_xy(src, dst, xy, what))
        bad = ~shapely.is_valid(geoms)
        if bad.any():  # reprojection can fold a ring that was valid
            geoms = np.array(
                [
                    _polygonal(shapely.make_valid(g)) if b else g
                    for g, b in zip(geoms, bad, strict=True)
                ],
                dtype=object,
            )
        return VectorLabels(self.path, geoms, self.names, self.kind, image.crs)

    def for_image(
        self,
        image: LazyImage,
        *,
        classes: Mapping[str, int] | None = None,
        outside: Outside = "ignore",
    ) -> VectorLabelImage:
        """The label image of ``image``: its pyramid, one uint8 channel, rasterized per window.

        ``classes`` maps names to label values (default :func:`resolve_classes` of this
        file's names). Polygons outside the image are dropped, with a warning; QuPath
        annotations all outside the image are an error (they belong to another slide),
        vector labels all outside give an empty label image (``empty``), the scene to skip.
        """
        import shapely

        if outside not in OUTSIDE:
            raise InputError(f"outside must be one of {', '.join(OUTSIDE)}, got {outside!r}")
        if classes is None:
            classes, _ = resolve_classes(self.names, outside=outside, source=str(self.path))
        unknown = sorted(set(self.names) - set(classes), key=name_key)
        if unknown:
            raise InputError(
                f"{self.path}: class {unknown[0]!r} is not in the class map; known classes: "
                f"{', '.join(sorted(classes, key=name_key))}"
            )
        framed = self.to_crs(image)
        geoms = framed.geoms
        extent = shapely.polygons(np.vstack([_extent_corners(image), _extent_corners(image)[:1]]))
        inside = shapely.intersects(geoms, extent) if len(geoms) else np.zeros(0, bool)
        n_out = int((~inside).sum())
        if len(geoms) and not inside.any():
            if self.kind == "annotations":
                b = shapely.total_bounds(geoms)
                raise InputError(
                    f"{self.path}: all {len(geoms)} annotations lie outside {image.path} "
                    f"(annotations span x {b[0]:.0f}..{b[2]:.0f}, y {b[1]:.0f}..{b[3]:.0f}; the "
                    f"image is {image.shape[1]}x{image.shape[0]} px); are they from another image?"
                )
        elif n_out:
            _warn(
                f"{self.path}: {n_out} of {len(geoms)} polygons lie outside {image.path}; "
                "they are ignored"
            )
        if not inside.any():
            _warn(f"{image.path}: no polygon of {self.path} overlaps it; it gets no labels")
        keep = np.flatnonzero(inside)
        _, names = resolve_classes(
            self.names, class_map=dict(classes), outside=outside, source=str(self.path)
        )
        return image.replace(
            VectorLabelImage,
            path=self.path,
            format="vector-labels",
            dtype=np.dtype(np.uint8),
            channels=1,
            compression=None,
            pixel_size=None,  # labels, not a microscope image: as label_view's labels
            metadata={"image": str(image.path), "kind": self.kind},
            nodata=None,
            band_names=None,
            vendor=None,
            objective_power=None,
            associated_images={},
            geoms=geoms[keep],
            values=np.array([classes[self.names[i]] for i in keep], dtype=np.uint8),
            outside=IGNORE_INDEX if outside == "ignore" else 0,
            class_names=names,
        )


# -- many images -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VectorLabelPlan:
    """Vector labels for a list of images: the file of each, and one class numbering for all.

    Made by :func:`plan_vector_labels`; :meth:`open` gives an image's label image.
    """

    kind: Kind
    files: tuple[Path, ...]
    classes: dict[str, int]
    class_names: list[str]
    label_field: str | None = None
    outside: Outside = "ignore"

    def open(self, index: int, image: LazyImage) -> VectorLabelImage:
        """The label image of ``image`` (the ``index``-th image of the plan)."""
        path = self.files[index]
        if self.kind == "annotations":
            labels = read_annotations(path, label_field=self.label_field)
        else:
            labels = read_vector_labels(path, label_field=self.label_field, image=image)
        return labels.for_image(image, classes=self.classes, outside=self.outside)

    def describe(self) -> dict[str, Any]:
        """Plain data for a patch store's attributes."""
        return {
            "kind": self.kind,
            "label_field": self.label_field,
            "outside": self.outside,
            "ignore_index": IGNORE_INDEX,
            "classes": dict(self.classes),
        }


def plan_vector_labels(
    images: Sequence[Path | str],
    *,
    annotations: str | os.PathLike[str] | None = None,
    vector_labels: str | os.PathLike[str] | None = None,
    label_field: str | None = None,
    outside: Outside = "ignore",
    class_map: Mapping[str, int] | None = None,
) -> VectorLabelPlan:
    """Match ``annotations`` (QuPath GeoJSON per image, see :func:`match_annotations`) or
    one ``vector_labels`` file (for every raster) to ``images`` and number their classes
    (:func:`resolve_classes` over the names of all the files)."""
    if (annotations is None) == (vector_labels is None):
        raise InputError("give either annotations (QuPath GeoJSON) or vector_labels, not both")
    if outside not in OUTSIDE:
        raise InputError(f"outside must be one of {', '.join(OUTSIDE)}, got {outside!r}")
    kind: Kind
    if annotations is not None:
        kind = "annotations"
        files = match_annotations(images, annotations)
    else:
        assert vector_labels is not None
        kind = "vector"
        files = [Path(vector_labels)] * len(images)
    found: set[str] = set()
    for f in dict.fromkeys(files):
        found |= read_class_names(f, kind=kind, label_field=label_field)
    source = str(files[0]) if len(set(files)) == 1 else "annotations"
    classes, names = resolve_classes(
        found, class_map=class_map or None, outside=outside, source=source
    )
    return VectorLabelPlan(kind, tuple(files), classes, names, label_field, outside)
