"""``tilenet plan``: the seeds' arithmetic, the plan for every model, and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tilenet.cli import main
from tilenet.config import ModelConfig
from tilenet.engine.plan import (
    activation_bytes,
    conv_params,
    dense_weights,
    format_plan,
    max_batch,
    parse_memory,
    plan_model,
)
from tilenet.errors import InputError
from tilenet.geometry import ceil_to
from tilenet.models import create_model, list_models, model_memory

# -- the seeds' arithmetic, exactly ---------------------------------------------------------


def test_conv_3_to_32_has_896_parameters() -> None:
    assert conv_params(3, 3, 32) == (3 * 3 * 3 + 1) * 32 == 896
    assert sum(p.numel() for p in nn.Conv2d(3, 32, 3).parameters()) == 896
    assert conv_params(3, 3, 32, bias=False) == 864


def test_activation_example_is_about_100_mb() -> None:
    n = activation_bytes(32, 64, 112, 112)
    assert n == 32 * 64 * 112 * 112 * 4 == 102_760_448
    assert torch.empty(32, 64, 112, 112).nbytes == n
    assert activation_bytes(32, 64, 112, 112, bytes_per_element=2) == n // 2  # half precision


def test_dense_first_layer_needs_3e9_weights() -> None:
    assert dense_weights(1000, 1000, 3, 1000) == 3 * 10**9
    # The same count nn.Linear would allocate (checked on a small input: no 12 GB here).
    assert nn.Linear(10 * 10 * 3, 1000, bias=False).weight.numel() == dense_weights(10, 10, 3)


@pytest.mark.parametrize(
    ("text", "want"),
    [("80GiB", 80 * 2**30), ("16GB", 16 * 10**9), ("512 MiB", 512 * 2**20), ("1e9", 10**9)],
)
def test_parse_memory(text: str, want: int) -> None:
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "0GiB", "-1GB"])
def test_parse_memory_rejects_nonsense(text: str) -> None:
    with pytest.raises(InputError, match="memory"):
        parse_memory(text)


# -- plan_model ------------------------------------------------------------------------------


def test_max_batch_is_the_largest_that_fits() -> None:
    m = create_model("unet")
    budget = 2 * 2**30
    for training in (False, True):
        b = max_batch(m, tile=512, precision="fp32", training=training, budget=budget)
        assert b >= 1
        fits = model_memory(m, tile=512, batch=b, training=training)["total_bytes"]
        over = model_memory(m, tile=512, batch=b + 1, training=training)["total_bytes"]
        assert fits <= budget < over


@pytest.mark.parametrize(
    "name",
    [  # the ResNet-34/50 models with -m slow (.ci/run runs them); tiny, unet, ResNet-18 here
        pytest.param(n, marks=pytest.mark.slow) if "resnet34" in n or "resnet50" in n else n
        for n in list_models()
        if not n.startswith("smp.")
    ],
)
def test_plan_works_for_every_model(name: str) -> None:
    s = {"tiny": 2, "unet": 16}.get(name, 32 if name.startswith("unet_") else 8)
    plan = plan_model(ModelConfig(name=name, num_classes=2), tile=512, memory="8GiB", measure=False)
    m = plan["model"]
    assert (m["name"], m["stride"]) == (name, s)
    assert plan["tiling"]["halo"] == ceil_to(m["receptive_field"], s)
    assert plan["tiling"]["min_tile"] == 2 * plan["tiling"]["halo"] + s
    assert plan["seeds"]["dense_weights"] == 512 * 512 * 3 * 1000
    assert plan["measured"] is None
    est = plan["memory"]["estimates"]
    for p in ("fp32", "bf16", "fp16"):
        assert est[p]["training"]["total_bytes"] > est[p]["inference"]["total_bytes"]
    assert (
        est["bf16"]["inference"]["activation_bytes"] < est["fp32"]["inference"]["activation_bytes"]
    )
    rows = plan["max_batch"]
    assert [r["tile"] for r in rows] == sorted(r["tile"] for r in rows)
    for r in rows:
        assert r["tile"] % s == 0
        assert r["bf16"]["inference"] >= r["fp32"]["inference"] >= r["fp32"]["training"]
    for a, b in itertools.pairwise(rows):
        assert b["fp32"]["inference"] <= a["fp32"]["inference"]
    text = format_plan(plan)
    for needle in ("parameters", "fully connected", "halo", "largest batch", "no CUDA"):
        assert needle in text


def test_plan_warns_with_the_layer_that_breaks_exact_tiling() -> None:
    cfg = ModelConfig(name="unet", kwargs={"depth": 2, "norm": "group"})
    plan = plan_model(cfg, tile=64, memory="1GiB", measure=False)
    assert plan["model"]["per_pixel_norm"] is False
    assert plan["model"]["exact_reason"].startswith("GroupNorm at stem.1")
    assert "whole input (GroupNorm at stem.1 (and " in format_plan(plan)
    plan = plan_model(ModelConfig(name="unet", kwargs={"depth": 2}), tile=64, measure=False)
    assert plan["model"]["per_pixel_norm"] is True and plan["model"]["exact_reason"] is None
    assert "warning" not in format_plan(plan)


def test_cli_plan_checks_the_weights_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(create_model("tiny", num_classes=3).state_dict(), tmp_path / "w.pt")
    argv = ["plan", "model.name=tiny", f"model.weights={tmp_path / 'w.pt'}"]
    assert main([*argv, "model.num_classes=3", "--tile", "64", "--no-measure"]) == 0
    assert "model        tiny" in capsys.readouterr().out
    assert main([*argv, "model.num_classes=2", "--tile", "64", "--no-measure"]) == 2
    assert "w.pt: weights do not fit model 'tiny'" in capsys.readouterr().err


def test_plan_rejects_bad_options() -> None:
    with pytest.raises(InputError, match="precision 'fp8'"):
        plan_model(ModelConfig(name="tiny"), precisions=["fp8"], measure=False)
    with pytest.raises(InputError, match="tile"):
        plan_model(ModelConfig(name="tiny"), tile=0, measure=False)


# -- CLI --------------------------------------------------------------------------------------


def test_cli_plan_json_from_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("model:\n  name: unet\n  in_channels: 1\n  kwargs:\n    depth: 3\n")
    argv = ["plan", f"conf={conf}", "model.kwargs.base=8", "--tile", "250", "--json"]
    assert main([*argv, "--memory", "1GiB", "--precision", "bf16"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["kwargs"] == {"depth": 3, "base": 8}
    assert plan["model"]["in_channels"] == 1
    assert plan["model"]["stride"] == 8
    assert plan["tiling"]["tile"] == 256  # rounded up to the stride
    assert plan["budget_bytes"] == 2**30
    assert list(plan["memory"]["estimates"]) == ["bf16"]


def test_cli_plan_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "model.name=tiny", "--tile", "64", "--memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "receptive    radius 4 px" in out
    assert "stride       2" in out
    assert "halo         4 px" in out
    assert "64x64x3 tile would need 12,288,000 weights" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.name=nope"], "unknown model 'nope'"),
        (["model.weights=/nonexistent/w.pt"], "/nonexistent/w.pt: weights file not found"),
        (["model.kwargs.depht=3"], "no option 'depht'"),
        (["model.nme=unet"], "unknown config key"),
        (["--memory", "lots"], "memory 'lots'"),
        (["conf=/nonexistent.yaml"], "config file not found"),
    ],
)
def test_cli_plan_bad_input_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", *args, "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# -- measured memory --------------------------------------------------------------------------


@pytest.mark.gpu
def test_unet_estimate_within_30_percent_of_cuda_peak() -> None:
    plan = plan_model(ModelConfig(name="unet"), tile=1024, batch=4, precisions=["fp32"])
    meas = plan["measured"]
    for mode in ("inference", "training"):
        assert meas[mode]["peak_bytes"] is not None, meas[mode]["error"]
        assert 0.7 <= meas[mode]["ratio"] <= 1.3, (mode, meas[mode])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*export_memory_timeline.*:FutureWarning")
@pytest.mark.parametrize("training", [False, True])
def test_unet_estimate_within_30_percent_of_cpu_profiler_peak(
    tmp_path: Path, training: bool
) -> None:
    """Without a GPU: the same check against the CPU allocator, via the profiler's timeline."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    m = create_model("unet", num_classes=3)
    x = torch.randn(2, 3, 256, 256)
    target = torch.randint(0, 3, (2, 256, 256))
    opt = torch.optim.AdamW(m.parameters())

    def step() -> None:
        if training:
            m.train()
            nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                m.eval()(x)

    step()  # optimizer state exists from here on, as in a running training
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    out = tmp_path / "timeline.json"
    prof.export_memory_timeline(str(out), device="cpu")
    _, sizes = json.loads(out.read_text())
    peak = max(sum(row) for row in sizes)
    est = model_memory(m, tile=256, batch=2, training=training)["total_bytes"]
    assert 0.7 <= peak / est <= 1.3, (peak, est)
