"""A typed InferConfig goes through ``infer_image``/``run_jobs`` as it is; options merge onto it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from tilenet.config import InferConfig
from tilenet.engine.checkpoint import save_checkpoint
from tilenet.engine.infer import infer_image, resolve_options
from tilenet.errors import ConfigError
from tilenet.models import ModelSpec, create_model


def test_a_clean_config_comes_back_as_it_is() -> None:
    cfg = InferConfig(tile=128, mode="gaussian", outputs=["classes"])
    assert resolve_options(config=cfg) is cfg
    assert resolve_options({}, config=cfg) is cfg


def test_options_merge_onto_the_config() -> None:
    cfg = InferConfig(tile=128, mode="gaussian", outputs=["classes"])
    got = resolve_options({"batch": 7, "tile": 64}, config=cfg)
    assert got == dataclasses.replace(cfg, batch=7, tile=64)
    assert cfg.tile == 128 and cfg.batch == 4  # the caller's config is not changed


def test_a_config_is_checked_and_loose_values_coerced() -> None:
    with pytest.raises(ConfigError, match="'mode'"):
        resolve_options(config=InferConfig(mode="sideways"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown output 'nope'"):
        resolve_options(config=InferConfig(outputs=["nope"]))
    with pytest.raises(ConfigError, match="overlap"):
        resolve_options({"overlap": 1.5}, config=InferConfig())
    loose = InferConfig(tile="96")  # type: ignore[arg-type]
    assert resolve_options(config=loose).tile == 96


def test_config_and_options_give_the_same_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=3)
    spec = ModelSpec.from_model(
        model, mean=[120.0] * 3, std=[60.0] * 3, class_names=["a", "b", "c"]
    )
    ckpt = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict()})
    img = tmp_path / "img.tif"
    arr = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    tifffile.imwrite(img, arr, tile=(32, 32), photometric="rgb")
    outs = ["probabilities", "classes"]
    a = infer_image(img, ckpt, tmp_path / "a", tile=64, outputs=outs, batch=2)
    cfg = InferConfig(tile=64, outputs=outs, batch=9)
    b = infer_image(img, ckpt, tmp_path / "b", config=cfg, batch=2)  # batch merged onto cfg
    assert a["tiles"] == b["tiles"] > 1  # tile=64 was used, not the default 1024
    for run in (tmp_path / "a", tmp_path / "b"):
        saved = yaml.safe_load((run / "config.yaml").read_text())["infer"]
        assert (saved["tile"], saved["batch"], saved["outputs"]) == (64, 2, outs)
    for name in ("probabilities", "classes"):
        ref = zarr.open_group(tmp_path / "a" / f"{name}.ome.zarr", mode="r")["0"][:]
        got = zarr.open_group(tmp_path / "b" / f"{name}.ome.zarr", mode="r")["0"][:]
        assert got.dtype == ref.dtype and np.array_equal(got, ref)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tile": 64, "outputs": ["classes", "probabilities"], "overlap": 0.5, "mode": "gaussian"},
        {"overlap": 0, "bands": (1, 2), "outputs": ("classes",)},  # int for float, tuples
        {"batch": 3, "heap": "flat", "probabilities_dtype": "float32", "stain": None},
        {"tile": "64", "overlap": "0.25"},  # strings: OmegaConf coerces them
    ],
)
def test_typed_options_resolve_as_omegaconf_resolves_them(options: dict) -> None:
    """Options already of their field's type skip OmegaConf's merge; the result is the same
    config, value types included, as the merge gives."""
    from omegaconf import OmegaConf

    want = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InferConfig), options))
    got = resolve_options(options)
    assert got == want
    assert [type(v) for v in dataclasses.astuple(got)] == [
        type(v) for v in dataclasses.astuple(want)
    ]
    with pytest.raises(ConfigError, match="mode"):
        resolve_options({**options, "mode": "nope"})


def test_config_yaml_is_omegaconfs_dump() -> None:
    """config.yaml's text (to_yaml of typed configs) is OmegaConf's own dump of them."""
    from omegaconf import OmegaConf

    from tilenet.config import ReaderConfig, ResolutionConfig, to_yaml

    cfg = {
        "reader": ReaderConfig(),
        "resolution": ResolutionConfig(mpp=0.5),
        "infer": resolve_options({"tile": 64, "overlap": 0, "bands": [2, 1], "stain": None}),
    }
    assert to_yaml(cfg) == OmegaConf.to_yaml(OmegaConf.create(cfg), resolve=True)
    assert to_yaml(cfg["infer"]) == OmegaConf.to_yaml(OmegaConf.structured(cfg["infer"]))
    assert "overlap: 0.0\n" in to_yaml(cfg)
