"""Class names of labels: the one numbering of the names label files use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from tilenet.errors import InputError
from tilenet.io.base import IGNORE_INDEX

__all__ = ["OUTSIDE", "Outside", "name_key", "resolve_classes"]

#: What pixels outside every polygon become: :data:`IGNORE_INDEX` (``train.ignore_index``'s
#: default, which the loss skips) or class 0, "background".
OUTSIDE = ("ignore", "background")
Outside = Literal["ignore", "background"]


# -- class names ---------------------------------------------------------------------------
def name_key(name: str) -> tuple[int, float, str]:
    """Sort key: numeric names by value (``"2"`` before ``"10"``), then text."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def resolve_classes(
    found: Iterable[str],
    *,
    class_map: Mapping[str, int] | None = None,
    outside: Outside = "ignore",
    source: str = "annotations",
) -> tuple[dict[str, int], list[str]]:
    """The label value of each class name, and the class names by index.

    Without ``class_map`` the names found are sorted (numbers by value) and numbered from 0;
    with ``outside="background"`` index 0 is ``"background"`` (shared with a class of that
    name) and the others follow. With ``class_map``, every name found must be in it.

    >>> resolve_classes(["Tumor", "Stroma", "Tumor"])
    ({'Stroma': 0, 'Tumor': 1}, ['Stroma', 'Tumor'])
    >>> resolve_classes(["Tumor"], outside="background")
    ({'Tumor': 1}, ['background', 'Tumor'])
    >>> resolve_classes(["a"], class_map={"a": 2, "b": 1})
    ({'a': 2, 'b': 1}, ['class_0', 'b', 'a'])
    """
    names = set(found)
    if class_map:
        cmap: dict[str, int] = {}
        for name, idx in class_map.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < IGNORE_INDEX:
                raise InputError(
                    f"class map: index {idx!r} of {name!r} must be an int in 0..{IGNORE_INDEX - 1}"
                    f" ({IGNORE_INDEX} is the ignore index)"
                )
            cmap[str(name)] = int(idx)
        unknown = sorted(names - set(cmap), key=name_key)
        if unknown:
            raise InputError(
                f"{source}: class {unknown[0]!r} is not in the class map; known classes: "
                f"{', '.join(sorted(cmap, key=name_key))}"
            )
        by_index = {v: k for k, v in sorted(cmap.items(), key=lambda kv: name_key(kv[0]))}
        if outside == "background" and 0 in by_index and by_index[0].lower() != "background":
            raise InputError(
                f"class map gives index 0 to {by_index[0]!r}, but outside=background labels "
                "pixels outside every polygon 0; map 'background' to 0 or use outside=ignore"
            )
        k = max(cmap.values()) + 1
        out = [by_index.get(i, f"class_{i}") for i in range(k)]
        if outside == "background" and 0 not in by_index:
            out[0] = "background"
        return cmap, out
    ordered = sorted(names, key=name_key)
    mapping: dict[str, int] = {}
    if outside == "background":
        bg = [n for n in ordered if n.lower() == "background"]
        out = [bg[0] if bg else "background"]
        mapping.update({n: 0 for n in bg})
        for n in ordered:
            if n.lower() != "background":
                mapping[n] = len(out)
                out.append(n)
    else:
        mapping = {n: i for i, n in enumerate(ordered)}
        out = list(ordered)
    if len(out) > IGNORE_INDEX:
        raise InputError(
            f"{source}: {len(out)} classes; at most {IGNORE_INDEX} fit a uint8 label "
            f"({IGNORE_INDEX} is the ignore index)"
        )
    return mapping, out
