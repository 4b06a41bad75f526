from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tilenet.engine.checkpoint import load_checkpoint, load_model, load_weights, save_checkpoint
from tilenet.errors import CheckpointError, ModelError
from tilenet.models import ModelSpec, TileModel, create_model


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": "tilenet-checkpoint", "spec": _Evil()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned.txt").exists()


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pt"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a tilenet checkpoint"):
        load_checkpoint(other)


def test_round_trip_is_plain_data(tmp_path: Path) -> None:
    spec = {
        "name": "tiny",
        "in_channels": 3,
        "num_classes": 2,
        "kwargs": {},
        "stride": 1,
        "receptive_field": 3,
    }
    payload = {"spec": spec, "model": {"w": torch.ones(3)}, "rng": [1, 2, 3]}
    path = save_checkpoint(tmp_path / "c.pt", payload)
    back = load_checkpoint(path)
    assert back["spec"] == spec
    assert torch.equal(back["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# -- the model spec inside ----------------------------------------------------------------------


def _bn_tiny(in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> TileModel:
    """A tiny model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = create_model("tiny", in_channels=in_channels, num_classes=num_classes)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_model_spec_is_stored_as_plain_data_and_loads_back(tmp_path: Path) -> None:
    src = _bn_tiny(in_channels=3, num_classes=3)
    spec = ModelSpec.from_model(src, mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0])
    path = save_checkpoint(tmp_path / "c.pt", {"spec": spec, "model": src.state_dict()})
    raw = load_checkpoint(path)["spec"]
    assert raw == spec.to_dict() and isinstance(raw["mean"], list)
    model, back = load_model(path)
    assert back == spec and back.exact is True
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_checkpoint_of_the_previous_layout_still_loads(tmp_path: Path) -> None:
    """A spec dict without the exact keys, as tilenet 0.1.0 wrote it with torch.save."""
    src = _bn_tiny(in_channels=3, num_classes=3)
    old_spec = {
        "name": "tiny",
        "in_channels": 3,
        "num_classes": 3,
        "kwargs": {},
        "stride": 2,
        "receptive_field": 4,
        "mean": [120.0, 121.0, 122.0],
        "std": [60.0, 61.0, 62.0],
        "class_names": ["bg", "a", "b"],
        "tilenet_version": "0.1.0",
    }
    body = {"format": "tilenet-checkpoint", "version": 1, "spec": old_spec}
    torch.save({**body, "model": src.state_dict(), "step": 3}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["spec"] == old_spec  # the raw payload
    model, spec = load_model(tmp_path / "old.pt")
    assert spec.mean == (120.0, 121.0, 122.0) and spec.class_names == ("bg", "a", "b")
    assert (spec.stride, spec.receptive_field, spec.tilenet_version) == (2, 4, "0.1.0")
    assert (spec.exact, spec.exact_reason) == (True, None)  # from the rebuilt model
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stride": None}, "checkpoint model spec: stride must be a positive int, got None"),
        ({"mean": [0.0]}, "checkpoint model spec: mean has 1 values for 3 input channels"),
        ({"name": 7}, "checkpoint model spec: name must be a non-empty str, got 7"),
    ],
)
def test_bad_spec_in_a_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, change: dict, message: str
) -> None:
    spec = {"name": "tiny", "in_channels": 3, "num_classes": 2, "stride": 2}
    spec["receptive_field"] = 4
    torch.save({"format": "tilenet-checkpoint", "spec": {**spec, **change}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"c.pt: {message}")) as info:
        load_checkpoint(tmp_path / "c.pt")
    assert "\n" not in str(info.value)
    del spec["stride"]
    torch.save({"format": "tilenet-checkpoint", "spec": spec}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=r"d\.pt: checkpoint model spec is missing 'stride'"):
        load_checkpoint(tmp_path / "d.pt")


def test_a_bad_spec_is_not_written(tmp_path: Path) -> None:
    spec = {"name": "tiny", "in_channels": 3, "num_classes": 0, "stride": 2}
    spec["receptive_field"] = 4
    with pytest.raises(ModelError, match="num_classes must be a positive int, got 0"):
        save_checkpoint(tmp_path / "c.pt", {"spec": spec, "model": {}})
    with pytest.raises(ModelError, match="is missing 'in_channels', 'num_classes', 'stride'"):
        save_checkpoint(tmp_path / "c.pt", {"spec": {"name": "tiny"}, "model": {}})
    assert not any(tmp_path.iterdir())


# -- bare weight files (models read no files; this module does) ---------------------------------


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match=r"nope\.pt: weights file not found"):
        load_weights(create_model("tiny"), path)


def test_weights_round_trip_state_dict_and_checkpoint(tmp_path: Path) -> None:
    src = _bn_tiny()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    spec = ModelSpec.from_model(src)
    save_checkpoint(tmp_path / "c.pt", {"spec": spec, "model": src.state_dict()})
    x = torch.randn(1, 1, 16, 16)
    want = src(x)
    for f in ("w.pt", "c.pt"):
        got = create_model("tiny", in_channels=1, num_classes=2)
        assert load_weights(got, tmp_path / f) is got
        torch.testing.assert_close(got.eval()(x), want)


def test_weights_that_do_not_fit_are_a_model_error(tmp_path: Path) -> None:
    torch.save(create_model("tiny", num_classes=5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"w.pt: weights do not fit model 'tiny'") as info:
        load_weights(create_model("tiny", num_classes=2), tmp_path / "w.pt")
    assert "\n" not in str(info.value)


def test_weights_holding_code_are_refused(tmp_path: Path) -> None:
    torch.save({"x": nn.ReLU()}, tmp_path / "evil.pt")  # a pickled object, not plain data
    with pytest.raises(ModelError, match=r"evil.pt: not a loadable weights file"):
        load_weights(create_model("tiny"), tmp_path / "evil.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"list.pt: weights file does not hold a state dict"):
        load_weights(create_model("tiny"), tmp_path / "list.pt")


@pytest.mark.slow  # ~2.5 s; .ci/run runs it
def test_torchvision_resnet_weights_fill_the_encoder(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    m = load_weights(create_model("unet_resnet18", in_channels=2), tmp_path / "r18.pt")
    assert isinstance(m, TileModel)
    torch.testing.assert_close(m.encoder.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    # Two-channel first conv: the RGB filters averaged, repeated, scaled by 3/2.
    want = ref.conv1.weight.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    torch.testing.assert_close(m.encoder.conv1.weight, want)
    torch.save({**ref.state_dict(), "layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=r"bad\.pt: weights do not fit the unet_resnet18 encoder"):
        load_weights(create_model("unet_resnet18"), tmp_path / "bad.pt")


@pytest.mark.parametrize(
    ("dtype", "top", "mean", "std", "warns"),
    [
        ("uint16", 40000, 120.0, 60.0, True),  # 16-bit data to a model trained on 8-bit data
        ("uint8", 250, 120.0, 60.0, False),
        ("uint8", 250, 2000.0, 800.0, True),  # 8-bit data to a model trained on 16-bit data
        ("uint16", 4000, 2000.0, 800.0, False),  # 12-bit data in uint16: the same scale
        ("float32", 1.0, 120.0, 60.0, True),  # 0..1 to a model trained on 0..255
        ("uint16", 40000, 0.0, 1.0, False),  # default statistics: nothing known
    ],
)
def test_an_input_on_another_scale_than_the_training_data_warns(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dtype: str,
    top: float,
    mean: float,
    std: float,
    warns: bool,
) -> None:
    """The checkpoint's normalisation statistics tell the scale of its training data: an
    image whose values lie on another scale gets one warning line, naming both."""
    import tifffile

    from tilenet.engine.infer import plan_image, resolve_options
    from tilenet.io import open_image

    model = create_model("tiny", in_channels=3, num_classes=2)
    spec = ModelSpec.from_model(model, mean=[mean] * 3, std=[std] * 3)
    ckpt = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict()})
    img = tmp_path / "img.tif"
    ramp = np.linspace(0, top, 40 * 40 * 3).reshape(40, 40, 3).astype(dtype)
    tifffile.imwrite(img, ramp, photometric="rgb")
    cfg = resolve_options({"tile": 64, "device": "cpu"})
    with (
        caplog.at_level("WARNING", logger="tilenet.engine.checkpoint"),
        open_image(img) as image,
    ):
        plan_image(image, spec, cfg, tmp_path / "out", model=ckpt)
    lines = [r.getMessage() for r in caplog.records if "trained on values" in r.getMessage()]
    assert len(lines) == (1 if warns else 0), lines
    if warns:
        assert str(img) in lines[0] and f"is {dtype}" in lines[0] and "\n" not in lines[0]
