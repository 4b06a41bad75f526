"""The plan refuses an output its disk cannot take, before anything is written.

The input is a GDAL VRT of 999,999² RGB pixels without sources (a real file of a few lines:
GDAL reads zeros), so its outputs need terabytes; the check compares their uncompressed
size with the free space of the real disk under ``tmp_path``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tilenet.cli import main
from tilenet.engine.checkpoint import save_checkpoint
from tilenet.engine.plan import check_disk
from tilenet.errors import InputError
from tilenet.io.location import location
from tilenet.models import ModelSpec, create_model
from tilenet.outputs.outputset import planned_bytes, reclaimable_bytes

SIDE = 999_999


@pytest.fixture
def huge(tmp_path: Path) -> tuple[Path, Path]:
    img = tmp_path / "huge.vrt"
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"/>' for b in (1, 2, 3))
    img.write_text(f'<VRTDataset rasterXSize="{SIDE}" rasterYSize="{SIDE}">{bands}</VRTDataset>')
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=2)
    spec = ModelSpec.from_model(model, mean=[128.0] * 3, std=[50.0] * 3)
    ckpt = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict()})
    need = planned_bytes((SIDE, SIDE), 2, ["classes"], "float16", georeferenced=False)
    if need <= shutil.disk_usage(tmp_path).free:
        pytest.skip(f"the disk under {tmp_path} has more than {need} bytes free")
    return img, ckpt


def _args(img: Path, ckpt: Path, out: Path, outputs: str = "classes") -> list[str]:
    return [
        *("infer", str(img), "--model", str(ckpt), "--out", str(out), "--tile", "1024"),
        *("--device", "cpu", "--quiet", "--outputs", outputs),
    ]


# The class map store and classes.ome.tif, each a uint8 pyramid (4/3 of 999,999² bytes);
# instances.ome.zarr adds uint32 ids with a pyramid.
@pytest.mark.parametrize(
    ("outputs", "size"), [("classes", "2.4 TiB"), ("classes,instances", "7.3 TiB")]
)
def test_an_output_larger_than_the_free_space_is_refused(
    huge: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    outputs: str,
    size: str,
) -> None:
    img, ckpt = huge
    out = tmp_path / "new" / "out"  # not there yet: the check asks its nearest folder
    assert main(_args(img, ckpt, out, outputs)) == 2
    said = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in said if line.startswith("tilenet: error:")]
    assert len(errors) == 1, said  # (a warning may come first: the image is all zeros)
    err = errors[0]
    assert str(img) in err and re.search(r" has [0-9.]+ [KMGT]iB free", err)
    assert f"{size} uncompressed" in err and "--no-disk-check" in err
    assert not out.exists()  # nothing written


def test_no_disk_check_plans_it_anyway(huge: tuple[Path, Path], tmp_path: Path) -> None:
    from tilenet.engine.infer import plan_image, resolve_options
    from tilenet.engine.predictor import Predictor
    from tilenet.errors import InputError
    from tilenet.io import open_image

    img, ckpt = huge
    cfg = resolve_options({"tile": 1024, "device": "cpu", "outputs": ["classes"]})
    spec = Predictor(ckpt, cfg).spec
    with open_image(img) as image:
        with pytest.raises(InputError, match="free"):
            plan_image(image, spec, cfg, tmp_path / "a", model=ckpt)
        unchecked = resolve_options({**vars(cfg), "disk_check": False})
        plan = plan_image(image, spec, unchecked, tmp_path / "b", model=ckpt)
    assert plan.grid.shape == (SIDE, SIDE) and (tmp_path / "b" / "classes.ome.zarr").is_dir()


def test_an_earlier_runs_files_count_as_room(tmp_path: Path) -> None:
    """What a resumed run keeps (its stores, its state) and what any run removes (half-written
    files, scratch) is the output's own room; other files in the folder are not."""
    out = tmp_path / "out"
    mib = 1 << 20
    rng = np.random.default_rng(0)
    for rel, size in [
        ("classes.ome.zarr/0/c/0/0", 48 * mib),  # a store's chunk
        (".tilenet/key.json", 1000),
        ("classes.ome.tif.partial-4242", 16 * mib),  # a killed run's half-written file
        ("notes.bin", 64 * mib),  # the user's: not ours to count
    ]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    ours = reclaimable_bytes(location(out))
    assert 64 * mib <= ours < 65 * mib
    assert reclaimable_bytes(location(tmp_path / "absent")) == 0
    need = shutil.disk_usage(tmp_path).free + 32 * mib  # fits only with the earlier run's
    check_disk(out, need, what="img.tif", reclaimable=ours)
    with pytest.raises(InputError, match=r"^img\.tif: the outputs in .* free;"):
        check_disk(out, need, what="img.tif")
    with pytest.raises(InputError, match=r"\(\+ 1[0-9.]* MiB its earlier run holds\)"):
        check_disk(out, need + 64 * mib, what="img.tif", reclaimable=16 * mib)
