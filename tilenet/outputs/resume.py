"""What an image's outputs are computed from: the key partial outputs are resumed under.

``tilenet infer`` and batch jobs make it the same way (:meth:`ResumeKey.of`), and the plan
adds its band layout (:meth:`ResumeKey.planned`). Its dict (:meth:`ResumeKey.to_dict`) is
what ``.tilenet/key.json`` and every band marker hold, and what a batch manifest compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from tilenet._version import __version__
from tilenet.config import InferConfig

__all__ = ["NOT_HASHED", "ResumeKey", "options_hash"]

#: Options that change how fast, not what is computed (left out of the key).
NOT_HASHED = ("readers", "device", "heap", "decode", "disk_check")


def options_hash(cfg: InferConfig) -> str:
    """A short hash of the options that change what is computed."""
    d = {k: v for k, v in asdict(cfg).items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResumeKey:
    """Input fingerprint, model checksum, options, version; the pixel size and band layout.

    Partial outputs are resumed only under an equal key. Fields left None are not part of
    the key's dict.
    """

    fingerprint: str
    model_checksum: str
    options_hash: str
    tilenet_version: str = __version__
    #: The pixel size asked for (a batch), then the one run at (the plan).
    resolution: dict[str, Any] | None = None
    #: Grid rows per band and the stitching mode (set by the plan).
    band_rows: int | None = None
    mode: str | None = None

    @classmethod
    def of(
        cls,
        fingerprint: str,
        model_checksum: str,
        cfg: InferConfig,
        *,
        resolution: dict[str, Any] | None = None,
    ) -> ResumeKey:
        """The key of an input (its :func:`tilenet.io.fingerprint`) run by a model (its file's
        checksum; a model in memory: a fresh random one, so nothing is resumed) with ``cfg``."""
        return cls(fingerprint, model_checksum, options_hash(cfg), resolution=resolution)

    def planned(self, *, band_rows: int, mode: str, resolution: dict[str, Any] | None) -> ResumeKey:
        """This key with a plan's band layout and, when it runs at one, its pixel size."""
        res = resolution if resolution is not None else self.resolution
        return dataclasses.replace(self, band_rows=band_rows, mode=mode, resolution=res)

    @property
    def seed(self) -> str:
        """What feature UUIDs are derived from: the same input and model, the same ids."""
        return f"{self.fingerprint}:{self.model_checksum}"

    def to_dict(self) -> dict[str, Any]:
        """The key as JSON data (what key files, markers and manifests hold)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def matches(self, data: object) -> bool:
        """Whether ``data`` (a key read back from JSON) is this key."""
        return data == json.loads(json.dumps(self.to_dict()))
