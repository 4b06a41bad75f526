"""Builders the tests share (``tests/conftest.py`` hands each out as a fixture too): a tiny
checkpoint, the whole-image reference pass that crop-mode exactness is checked against, and a
tiled pyramidal TIFF. torch is imported only when a checkpoint or reference is built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

if TYPE_CHECKING:
    from tilenet.models import TileModel

__all__ = ["kill_when", "make_checkpoint", "normalized", "pyramid_tiff", "whole_image_reference"]


def _stripes(model: Any) -> None:
    """Hand-set ``tiny`` weights: class 1 where band 1 is bright, 2 where band 2 is, else 0."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        conv, bn, head = model.enc[0], model.enc[1], model.head
        bn.weight.fill_(1.0)
        conv.weight[0, 0, 1, 1] = 1.0  # e0 = relu(normalised band 1)
        conv.weight[1, 1, 1, 1] = 1.0  # e1 = relu(normalised band 2)
        head.weight[1, 0, 0, 0] = 1.0
        head.weight[2, 1, 0, 0] = 1.0
        head.bias[0] = 0.5


def make_checkpoint(
    path: Path,
    name: str = "tiny",
    *,
    model: TileModel | None = None,
    num_classes: int = 3,
    in_channels: int = 3,
    seed: int | None = 0,
    mean: Sequence[float] = (120.0, 120.0, 120.0),
    std: Sequence[float] = (60.0, 60.0, 60.0),
    class_names: Sequence[str] | None = None,
    bn_stats: bool = False,
    stripes: bool = False,
    **kwargs: Any,
) -> Path:
    """Save a real tilenet checkpoint of registry model ``name`` (or of ``model``) at ``path``.

    ``seed`` seeds torch before the model is built (None: leave the generator alone);
    ``bn_stats`` draws non-trivial BatchNorm running statistics, so that eval-mode BN is part
    of what an exactness test checks; ``stripes`` sets a ``tiny`` model's weights by hand
    (class 1 where band 1 is bright, 2 where band 2 is, else 0); ``kwargs`` go to
    ``create_model``.
    """
    import torch

    from tilenet.engine.checkpoint import save_checkpoint
    from tilenet.models import ModelSpec, create_model

    if seed is not None:
        torch.manual_seed(seed)
    if model is None:
        model = create_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    if stripes:
        _stripes(model)
    if bn_stats:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    names = None if class_names is None else list(class_names)
    spec = ModelSpec.from_model(model, mean=list(mean), std=list(std), class_names=names)
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


def normalized(
    raw: np.ndarray, valid: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """(h, w, C) -> float32 (raw - mean) / std, zero outside ``valid`` (after normalising)."""
    x = raw.astype(np.float32)
    x -= np.asarray(mean, np.float32)
    x *= np.float32(1.0) / np.asarray(std, np.float32)
    x[valid[0] :] = 0
    x[:, valid[1] :] = 0
    return x


def whole_image_reference(
    model: Path | TileModel,
    arr: np.ndarray,
    *,
    tta: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Softmax (K, H, W) of one forward pass over the whole ``arr`` (H, W, C): what crop-mode
    tiling must reproduce. The image is normalised, then zero-padded to the model's stride.

    ``model`` is a checkpoint path (its spec gives mean and std) or a model in memory (pass
    ``mean`` and ``std``).
    """
    import torch

    from tilenet.engine.checkpoint import load_model
    from tilenet.engine.predictor import predict
    from tilenet.geometry import ceil_to

    if isinstance(model, Path):
        model, spec = load_model(model)
        mean, std = spec.mean, spec.std
    assert mean is not None and std is not None, "a model in memory needs mean and std"
    h, w = arr.shape[:2]
    s = model.stride
    x = np.zeros((ceil_to(h, s), ceil_to(w, s), arr.shape[2]), np.float32)
    x[:h, :w] = normalized(arr, (h, w), mean, std)
    with torch.inference_mode():
        t = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()
        return predict(model.eval(), t, tta=tta)[0, :, :h, :w].numpy()


def pyramid_tiff(
    path: Path,
    arr: np.ndarray,
    *,
    levels: int = 2,
    tile: tuple[int, int] | tuple[tuple[int, int], ...] = (32, 32),
    axes: str | None = None,
    pixel_size: tuple[float, float] | None = None,
    **options: Any,
) -> list[np.ndarray]:
    """Write ``arr`` as a tiled pyramidal TIFF at ``path``: level 0 with ``levels - 1`` SubIFDs,
    each reduced level (NewSubfileType 1) taken every 2**k pixels; return the levels written.

    ``axes`` ("YXS", "CYX", "YX"; default from the shape) and ``pixel_size`` (x, y in um)
    go to the OME/shaped metadata; ``tile`` is one tile size or one per level; ``options``
    (compression, photometric, bigtiff, ome, ...) go to tifffile. An (H, W, 3) array is
    written as RGB unless ``photometric`` says otherwise.
    """
    if axes is None:
        axes = {2: "YX", 3: "YXS"}[arr.ndim]
    tiles = tile if isinstance(tile[0], tuple) else (tile,) * levels
    writer = {k: options.pop(k) for k in ("bigtiff", "ome") if k in options}
    if axes == "YXS" and arr.shape[-1] == 3:
        options.setdefault("photometric", "rgb")
    meta: dict[str, Any] = {"axes": axes}
    if pixel_size is not None:
        meta.update(PhysicalSizeX=pixel_size[0], PhysicalSizeY=pixel_size[1])
    out = []
    with tifffile.TiffWriter(path, **writer) as tw:
        for k in range(levels):
            f = 2**k
            level = arr[:, ::f, ::f] if axes.startswith("C") else arr[::f, ::f]
            if k == 0:
                tw.write(level, subifds=levels - 1, tile=tiles[0], metadata=meta, **options)
            else:
                tw.write(level, subfiletype=1, tile=tiles[k], **options)
            out.append(level)
    return out


def kill_when(cmd: list[str], ready: Callable[[], bool], *, timeout: float = 120) -> None:
    """Run ``cmd`` (one thread) and SIGKILL it once ``ready()`` holds (a marker on disk): a
    real kill in the middle of a run. Fails if the run ends first or ``timeout`` passes."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
