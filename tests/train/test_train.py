"""python -m tilenet.train: run directory contract, exact resume, DDP under torchrun, configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tilenet.config import Config, InferConfig, load_config
from tilenet.engine.checkpoint import load_checkpoint, load_model
from tilenet.patches.synth import synthesize
from tilenet.patches.tiler import tile_images
from tilenet.train import evaluate_images, main, prepare_demo_data, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-image training store (32 px patches, 4 per chunk) and a 1-image validation store."""
    root = tmp_path_factory.mktemp("train-data")
    synthesize(root / "train", size=128, count=2, seed=0, tile=64)
    synthesize(root / "val", size=64, count=1, seed=1, tile=64)
    out = {}
    for name, chunk in (("train", 4), ("val", 2)):
        out[name] = tile_images(
            [root / name / "images"],
            labels=root / name / "labels",
            out=root / f"{name}.zarr",
            patch=32,
            overlap=0,
            workers=1,
            chunk_patches=chunk,
            progress=False,
        )
    out["train_images"] = root / "train" / "images"
    out["train_labels"] = root / "train" / "labels"
    out["val_image"] = root / "val" / "images" / "synth_000.tif"
    out["val_label"] = root / "val" / "labels" / "synth_000.tif"
    return out


def _overrides(stores: dict[str, Path], out: Path, **extra: object) -> list[str]:
    base: dict[str, object] = {
        "data.stores": f"[{stores['train']}]",
        "data.val_stores": f"[{stores['val']}]",
        "data.patch": 32,
        "data.batch_size": 8,
        "data.shuffle_buffer": 8,
        "model.name": "tiny",
        "model.kwargs.width": 4,
        "model.num_classes": 3,
        "train.device": "cpu",
        "train.progress": False,
        "train.steps": 6,
        "train.warmup_steps": 2,
        "train.lr": 0.01,
        "train.val_every": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 100,
        "train.out_dir": out,
        "infer.tile": 64,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- the command ------------------------------------------------------------------------------
def test_help_explains_overrides_and_sections(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "conf=FILE" in text and "key=value" in text
    for section in ("data", "model", "train", "infer"):
        assert f"\n  {section} " in text


def test_bad_arguments_and_configs_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["not-a-key-value"])
    assert exc.value.code == 2
    assert main([f"conf={tmp_path / 'missing.yaml'}"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "valid keys" in err
    assert main(["train.best_metric=accuracy"]) == 2
    assert "not a metric" in capsys.readouterr().err


# -- tilenet train: the CLI subcommand -------------------------------------------------------
def test_tilenet_train_help_teaches_conf_and_overrides(capsys) -> None:
    from tilenet.cli import main as cli

    with pytest.raises(SystemExit) as exc:
        cli(["--help"])
    assert exc.value.code == 0
    assert "\n    train " in capsys.readouterr().out  # listed among the commands
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: tilenet train" in text and "conf=FILE" in text and "key=value" in text
    assert "tilenet train conf=conf/demo.yaml train.steps=20" in text  # an example
    for section in ("data", "model", "train", "infer"):
        assert f"\n  {section} " in text


def test_tilenet_train_parser_imports_no_torch() -> None:
    code = (
        "import sys; from tilenet.cli import build_parser; build_parser(); "
        "sys.exit(3 if {'torch', 'omegaconf'} & set(sys.modules) else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_tilenet_train_trains_and_reports_errors(stores, tmp_path: Path, capsys) -> None:
    from tilenet.cli import main as cli

    over = {"train.steps": 2, "train.val_every": 2}
    assert cli(["train", *_overrides(stores, tmp_path / "r", **over)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run_dir: {tmp_path / 'r'}"
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2
    assert [r["step"] for r in _records(tmp_path / "r") if "val_dice" in r] == [2]
    # --print-config prints what python -m tilenet.train --print-config prints
    items = [f"conf={REPO / 'conf' / 'demo.yaml'}", "train.steps=7"]
    assert cli(["train", *items, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert main([*items, "--print-config"]) == 0
    assert capsys.readouterr().out == printed and "steps: 7" in printed
    # bad items are one-line errors, exit 2
    assert cli(["train", "not-a-key-value"]) == 2
    assert "'not-a-key-value' must be conf=FILE or key=value" in capsys.readouterr().err
    assert cli(["train", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "valid keys" in err


@pytest.mark.slow
def test_tilenet_train_equals_python_dash_m(stores, tmp_path: Path, capsys) -> None:
    """The same items through both entry points train the same weights, bit for bit."""
    from tilenet.cli import main as cli

    over = {"train.steps": 2, "train.val_every": 2, "train.deterministic": True}
    assert cli(["train", *_overrides(stores, tmp_path / "cli", **over)]) == 0
    assert main(_overrides(stores, tmp_path / "m", **over)) == 0
    a, b = (
        load_checkpoint(tmp_path / "cli" / "last.pt"),
        load_checkpoint(tmp_path / "m" / "last.pt"),
    )
    assert a["step"] == b["step"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_channel_mismatch_is_a_clear_error(stores, tmp_path: Path, capsys) -> None:
    assert main(_overrides(stores, tmp_path / "r", **{"model.in_channels": 4})) == 2
    assert "model.in_channels=4 but the training data has 3 channels" in capsys.readouterr().err


@pytest.mark.slow  # ~1.5 s; .ci/run runs it
def test_starts_from_a_weights_file(stores, tmp_path: Path, capsys) -> None:
    from tilenet.models import create_model

    torch.manual_seed(1)
    src = create_model("tiny", in_channels=3, num_classes=3, width=4).state_dict()
    torch.save(src, tmp_path / "w.pt")
    opts = {"model.weights": tmp_path / "w.pt", "train.lr": 0.0, "train.steps": 2}
    run = train(load_config(None, _overrides(stores, tmp_path / "r", **opts)))
    got = load_checkpoint(run / "last.pt")["model"]
    for k, v in src.items():  # lr 0: the convolutions are still the loaded ones
        if k.endswith(".weight") and v.ndim == 4:
            torch.testing.assert_close(got[k], v)
    opts["model.weights"] = tmp_path / "missing.pt"
    assert main(_overrides(stores, tmp_path / "r2", **opts)) == 2
    assert "missing.pt: weights file not found" in capsys.readouterr().err


def test_run_directory_contract(
    stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # out_dir defaults to runs/<timestamp> under the cwd
    args = _overrides(
        stores,
        "",
        **{"train.val_images": f"[{stores['val_image']}]", "train.val_images_every": 4},
    )
    args = [a for a in args if not a.startswith("train.out_dir=")]
    args.append(f"train.val_labels=[{stores['val_label']}]")
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("run_dir: ")
    run_dir = Path(lines[-1][len("run_dir: ") :])
    assert run_dir.parent == Path("runs")
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png"):
        assert (run_dir / name).is_file(), name
    # the saved config is the resolved one and loads back
    saved = load_config(run_dir / "config.yaml")
    assert saved.model.name == "tiny" and saved.train.steps == 6
    recs = _records(run_dir)
    train_lines = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["patches_per_s"] > 0 and r["lr"] > 0 for r in train_lines)
    val_lines = [r for r in recs if "val_dice" in r]
    assert [r["step"] for r in val_lines] == [2, 4, 6]
    for r in val_lines:
        assert r["val_patches"] == 4
        assert set(r["val_dice_per_class"]) == {"background", "cell", "stroma"}
    held = [r for r in recs if "heldout_dice" in r]
    # scored every 4 steps during training, and once more when it ends
    assert [r["step"] for r in held] == [4, 6]
    assert held[0]["heldout_pixels"] == held[1]["heldout_pixels"] == 64 * 64
    assert "val_dice" in held[0] and held[1]["train_s"] > 0
    # checkpoints: complete training state, and alone enough for inference
    ckpt = load_checkpoint(run_dir / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "config"):
        assert key in ckpt, key
    assert ckpt["step"] == 6
    spec = ckpt["spec"]
    assert spec["name"] == "tiny" and spec["stride"] == 2 and spec["in_channels"] == 3
    assert spec["class_names"] == ["background", "cell", "stroma"]
    assert len(spec["mean"]) == 3 and all(s > 0 for s in spec["std"])
    model, spec2 = load_model(run_dir / "best.pt")
    assert spec2.num_classes == 3
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with Image.open(run_dir / "curves.png") as curves:  # axes, ticks, legend: matplotlib's
        assert curves.format == "PNG" and curves.size == (1000, 400)
        assert curves.info["Software"].startswith("Matplotlib version")


def test_uint8_batches_normalised_on_the_device_train_the_same_model(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """``data.output=uint8`` (raw batches, 4x less to move; normalised where the model runs)
    trains bit for bit what float batches train: it crashed in the first step before (a
    uint8 tensor reached the first convolution)."""
    common = {"train.deterministic": True, "train.steps": 3, "train.val_every": 3}
    runs = [
        train(load_config(None, _overrides(stores, tmp_path / out, **common, **extra)))
        for out, extra in (("float", {}), ("uint8", {"data.output": "uint8"}))
    ]
    a, b = (load_checkpoint(r / "last.pt") for r in runs)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    val = [[r["val_loss"] for r in _records(r) if "val_loss" in r] for r in runs]
    assert val[0] == val[1] and len(val[0]) == 1


# With a DataLoader worker process: slow (.ci/run runs it); in-process loading stays fast.
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_exact_resume_matches_uninterrupted_run(stores, tmp_path: Path, workers: int) -> None:
    """Killed after step 3 and resumed == never interrupted (deterministic CPU).

    2 accumulated batches per step and 4 batches per epoch: the interruption falls in the
    middle of epoch 1, after a validation, with augmentation on.
    """
    common = {
        "train.deterministic": True,
        "train.grad_accum": 2,
        "train.grad_clip": 1.0,
        "data.num_workers": workers,
    }
    a = train(load_config(None, _overrides(stores, tmp_path / "a", **common)))
    b = tmp_path / "b"
    train(load_config(None, _overrides(stores, b, **common, **{"train.max_steps_this_run": 3})))
    first = load_checkpoint(b / "last.pt")
    assert first["step"] == 3 and first["data_pos"] == [[1, 2]]
    assert not (b / "curves.png").exists()  # an interrupted run is not finished
    with open(b / "metrics.jsonl", "a") as fh:  # logged after the checkpoint, then killed
        fh.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    train(load_config(None, _overrides(stores, b, **common, **{"train.resume": True})))
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert cb["step"] == 6
    assert ca["model"].keys() == cb["model"].keys()
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key]))
    # the same losses at every step; the resumed log has each step once
    la = [(r["step"], r["loss"]) for r in _records(a) if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in _records(b) if "loss" in r]
    assert la == lb
    # and a different seed really does train differently (by step 3, as far as b's first run)
    other = {"train.seed": 1, "train.max_steps_this_run": 3}
    c = train(load_config(None, _overrides(stores, tmp_path / "c", **common, **other)))
    cc = load_checkpoint(c / "last.pt")
    assert cc["step"] == 3
    assert not all(torch.equal(v, cc["model"][k]) for k, v in first["model"].items())


@pytest.mark.parametrize(
    "opts",
    [
        {"train.precision": "bf16", "train.optimizer": "sgd", "train.schedule": "onecycle"},
        pytest.param(  # slow: the bf16 case above keeps the option matrix in the default run
            {"train.precision": "fp16", "train.loss": "dice", "train.channels_last": False},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_precisions_optimizers_schedules(stores, tmp_path: Path, opts: dict) -> None:
    run = train(load_config(None, _overrides(stores, tmp_path / "r", **opts)))
    recs = [r for r in _records(run) if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in recs)
    lrs = [r["lr"] for r in recs]
    assert len(set(lrs)) > 1  # the schedule moves the learning rate
    ckpt = load_checkpoint(run / "last.pt")
    if opts["train.precision"] == "fp16":
        assert "scale" in ckpt["scaler"]  # the GradScaler state is saved


@pytest.mark.slow  # exact resume stays in the default run: test_exact_resume_matches_...[0]
def test_trains_on_random_crops_of_images_and_resumes_exactly(stores, tmp_path: Path) -> None:
    """No patch store: crops read lazily from image + label directories."""
    common = {
        "data.stores": "[]",
        "data.images": stores["train_images"],
        "data.labels": stores["train_labels"],
        "data.samples_per_epoch": 16,
        "train.deterministic": True,
        "train.steps": 4,
    }
    a = train(load_config(None, _overrides(stores, tmp_path / "a", **common)))
    b = tmp_path / "b"
    train(load_config(None, _overrides(stores, b, **common, **{"train.max_steps_this_run": 3})))
    train(
        load_config(None, _overrides(stores, b, **common, **{"train.resume": str(b / "last.pt")}))
    )
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == 1 and cb["step"] == 4
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    # crops are normalised with statistics computed from the images
    assert ca["spec"]["mean"] != [0.0, 0.0, 0.0]


@pytest.mark.slow  # ~2 s; .ci/run runs it
def test_early_stopping_and_best_by_loss(stores, tmp_path: Path) -> None:
    # lr 0: nothing changes, so the first validation stays the best and patience runs out
    over = {
        "train.lr": 0.0,
        "train.steps": 20,
        "train.best_metric": "val_loss",
        "train.early_stop_patience": 2,
    }
    run = train(load_config(None, _overrides(stores, tmp_path / "r", **over)))
    recs = _records(run)
    assert max(r["step"] for r in recs) == 6  # validations at 2 (best), 4, 6 (2 without gain)
    best = load_checkpoint(run / "best.pt")
    first_val = next(r for r in recs if "val_loss" in r)
    assert first_val["step"] == 2
    assert best["step"] == 2 and best["metrics"]["best"] == first_val["val_loss"]


def test_heldout_scores_equal_a_whole_image_pass(stores) -> None:
    from tilenet.io import open_image
    from tilenet.models import ModelSpec, create_model
    from tilenet.train.metrics import confusion_matrix, scores_from_confusion

    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=3, width=4)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    names = ["b", "c", "s"]
    spec = ModelSpec.from_model(model, mean=[128.0] * 3, std=[50.0] * 3, class_names=names)
    got = evaluate_images(
        (model, spec),
        [(stores["val_image"], stores["val_label"])],
        infer=InferConfig(tile=32, device="cpu"),
    )
    with open_image(stores["val_image"]) as img, open_image(stores["val_label"]) as lab:
        x = img.read(_full(img))
        t = lab.read(_full(lab))[..., 0]
    x = torch.from_numpy((x.astype(np.float32) - 128.0) / 50.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        pred = model(x).argmax(1)[0]
    want = scores_from_confusion(confusion_matrix(pred, torch.from_numpy(t), 3))
    assert got["pixels"] == want["pixels"] == 64 * 64
    assert got["dice"] == pytest.approx(want["dice"], abs=1e-3)
    assert model.training is False  # evaluation works on a copy, the model is untouched


def _full(img):
    from tilenet.geometry import Window

    h, w = img.shape[:2]
    return Window(0, 0, h, w)


def test_prepare_demo_data_makes_and_reuses(tmp_path: Path) -> None:
    cfg = OmegaConf.structured(Config).data
    cfg.synth_dir = str(tmp_path / "demo")
    cfg.synth_size, cfg.synth_count, cfg.patch = 64, 2, 32
    got = prepare_demo_data(cfg)
    assert [Path(p).name for p in got["stores"]] == ["patches_32.zarr"]
    assert Path(got["val_images"][0]).is_file() and Path(got["val_labels"][0]).is_file()
    image = Path(got["val_images"][0])
    stamp = image.stat().st_mtime_ns
    again = prepare_demo_data(cfg)
    assert again == got and image.stat().st_mtime_ns == stamp  # not regenerated


@pytest.mark.slow
def test_torch_compile_path(stores, tmp_path: Path) -> None:
    run = train(load_config(None, _overrides(stores, tmp_path / "r", **{"train.compile": True})))
    assert all(np.isfinite(r["loss"]) for r in _records(run) if "loss" in r)
    load_model(run / "last.pt")  # the state dict has no compile wrapper prefixes


@pytest.mark.slow
def test_demo_config_meets_the_quality_bar(tmp_path: Path, monkeypatch, capsys) -> None:
    """conf/demo.yaml from scratch (synthesise, tile, train): held-out foreground Dice >= 0.90.

    The issue's budget is 5 minutes on 2 CPU cores; wall time depends on the machine's load,
    so it is printed rather than asserted.
    """
    import time

    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main([f"conf={REPO / 'conf' / 'demo.yaml'}", "train.progress=false"]) == 0
    wall = time.perf_counter() - t0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1])
    held = [r for r in _records(run_dir) if "heldout_dice" in r][-1]
    print(f"demo: held-out foreground Dice {held['heldout_dice']:.4f} in {wall:.0f} s")
    assert held["heldout_dice"] >= 0.90


# -- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "demo", "pathology", "multiband"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "conf" / f"{name}.yaml")
    assert cfg.model.num_classes >= 2


def test_default_yaml_lists_every_key_at_its_default(capsys) -> None:
    assert main(["--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == OmegaConf.to_yaml(OmegaConf.structured(Config))
    shipped = OmegaConf.to_yaml(OmegaConf.load(REPO / "conf" / "default.yaml"))
    assert shipped == printed, (
        "conf/default.yaml is out of date with tilenet/config.py; regenerate it with "
        "`python -m tilenet.train --print-config > conf/default.yaml`"
    )


# -- DDP --------------------------------------------------------------------------------------
# Runs `python -m tilenet.train` unchanged, then, before the interpreter exits, fails the rank
# (exit 3) if any thread of the gloo process group is still alive: a group that
# destroy_process_group() could not free (as when DDP's first import of torch._dynamo, after
# init_process_group, pinned it) kept those threads running into interpreter exit, where a
# rank now and then aborted with "terminate called without an active exception".
_EXIT_CHECK = """\
import os, runpy, sys

def _gloo_threads():
    if not os.path.isdir("/proc/self/task"):  # Linux only
        return []
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)

try:
    runpy.run_module("tilenet.train", run_name="__main__", alter_sys=True)
finally:
    left = _gloo_threads()
    if left:
        print(f"rank {os.environ.get('RANK')}: gloo threads alive at exit: {left}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)
"""


def _torchrun(conf: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    launcher = conf.with_name("train_exit_check.py")
    launcher.write_text(_EXIT_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(launcher), f"conf={conf}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # three processes import torch: ~20 s on 2 cores (.ci/run runs it)
def test_torchrun_two_gloo_processes(stores, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    conf = tmp_path / "ddp.yaml"
    conf.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(_overrides(stores, out))))
    proc = _torchrun(conf)
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("run_dir: ")]
    assert printed == [f"run_dir: {out}"]  # rank 0 alone prints, and prints it last
    assert proc.stdout.strip().splitlines()[-1] == printed[0]
    recs = _records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer
    val = [r for r in recs if "val_dice" in r]
    # the 4 validation patches are split over the 2 ranks; all-reduced they are all counted
    assert [r["val_patches"] for r in val] == [4, 4, 4]
    ckpt = load_checkpoint(out / "last.pt")
    assert len(ckpt["data_pos"]) == 2 and len(ckpt["rng"]) == 2
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left


@pytest.mark.slow
def test_torchrun_resume_is_exact_per_rank(stores, tmp_path: Path) -> None:
    """2 gloo ranks stopped after step 3 and resumed == an uninterrupted 2-rank run."""
    conf = tmp_path / "ddp.yaml"
    over = _overrides(stores, "unused", **{"train.deterministic": True})
    conf.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(over)))
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(conf, f"train.out_dir={a}")
    _torchrun(conf, f"train.out_dir={b}", "train.max_steps_this_run=3")
    _torchrun(conf, f"train.out_dir={b}", "train.resume=true")
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert cb["step"] == 6 and cb["data_pos"] == ca["data_pos"]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
