"""The stain normaliser travels with the model: training with ``data.stain`` stores the fitted
state in the checkpoint's spec, and ``tilenet infer`` applies it without naming the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from slidewriters import write_aperio_svs
from test_stain import synthetic_he
from test_tissue import MPP, synthetic_slide

from tilenet.cli import main
from tilenet.config import load_config
from tilenet.engine.checkpoint import load_checkpoint
from tilenet.patches.tiler import tile_images
from tilenet.stain import make_stain, plain_state, stain_from_state
from tilenet.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, slide, reference): a tiny model trained 2 steps with data.stain, and an
    H&E slide to run it on (tissue to estimate its stains from, a pixel size)."""
    root = tmp_path_factory.mktemp("stain-model")
    for d in ("images", "labels"):
        (root / d).mkdir()
    he = synthetic_he(1, size=96, h_gain=1.4, e_gain=0.7)
    tifffile.imwrite(root / "images" / "a.tif", he, photometric="rgb")
    tifffile.imwrite(root / "labels" / "a.tif", (he.mean(-1) < 200).astype(np.uint8))
    store = tile_images(
        [root / "images"], labels=root / "labels", out=root / "a.zarr", patch=32, overlap=0,
        workers=1, progress=False,
    )  # fmt: skip
    ref = root / "ref.png"
    Image.fromarray(synthetic_he(5, h_gain=1.5)).save(ref)
    overrides = {
        "data.stores": f"[{store}]",
        "data.val_stores": f"[{store}]",
        "data.patch": 32,
        "data.batch_size": 4,
        "data.shuffle_buffer": 4,
        "data.stain": str(ref),
        "model.name": "tiny",
        "model.kwargs.width": 4,
        "model.num_classes": 2,
        "train.device": "cpu",
        "train.progress": False,
        "train.steps": 2,
        "train.warmup_steps": 1,
        "train.val_every": 100,
        "train.checkpoint_every": 100,
        "train.out_dir": root / "run",
    }
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    slide = write_aperio_svs(root / "slide.svs", synthetic_slide()[0], mpp=MPP, levels=(4, 16))
    return root / "run" / "last.pt", slide, ref


def test_checkpoint_stores_the_fitted_reference(trained: tuple[Path, Path, Path]) -> None:
    ckpt, _, ref = trained
    state = load_checkpoint(ckpt)["spec"]["stain"]
    fitted = make_stain("macenko", np.array(Image.open(ref).convert("RGB")))
    assert state == plain_state(fitted)  # stain matrix and max concentrations, as plain lists
    assert np.asarray(state["stain_matrix"]).shape == (3, 2) and len(state["max_conc"]) == 2
    again = stain_from_state(state)
    assert (again.stain_matrix == fitted.stain_matrix).all()


def test_infer_reuses_the_models_stain_unless_told_otherwise(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ckpt, image, ref = trained
    args = ["infer", str(image), "--model", str(ckpt), "--level", "1", "--tile", "64"]
    args += ["--outputs", "probabilities", "--probabilities-dtype", "float32"]
    probs = {}
    for name, extra in (
        ("model", []),
        ("ref", ["--stain", str(ref)]),
        ("off", ["--stain", "none"]),
    ):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        group = zarr.open_group(tmp_path / name / "probabilities.ome.zarr", mode="r")
        probs[name] = np.asarray(group["0"])
    np.testing.assert_array_equal(probs["model"], probs["ref"])  # the same normaliser
    assert np.abs(probs["model"] - probs["off"]).max() > 1e-4  # and it did change the input
