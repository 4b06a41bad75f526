"""Model registry: every model's contract, and its declared stride and receptive field.

The receptive field is checked two ways against the real network (eval mode, random weights
and random BatchNorm statistics so no layer is the identity):

* gradient of one output pixel with respect to the input is zero beyond the declared
  dependency interval and reaches close to it;
* the property tiling needs: the output at the centre of a larger input equals the output of
  a crop of ``2 * ceil_to(rf, stride) + stride`` around it, and a smaller crop differs.

The ResNet-based models are checked along one axis with thin inputs (tall, ``2 * stride``
wide, so the other axis is identical in both passes), which keeps them cheap on a CPU.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tilenet.errors import ModelError
from tilenet.geometry import ceil_to
from tilenet.models import (
    ModelSpec,
    TileModel,
    analyze,
    create_model,
    create_model_from_config,
    exactness,
    list_models,
    model_memory,
    smp_models,
)

ALL = [
    "deeplabv3_resnet50",
    "fcn_resnet50",
    "tiny",
    "unet",
    "unet_resnet18",
    "unet_resnet34",
    "unet_resnet50",
]
STRIDES = {
    "deeplabv3_resnet50": 8,
    "fcn_resnet50": 8,
    "tiny": 2,
    "unet": 16,
    "unet_resnet18": 32,
    "unet_resnet34": 32,
    "unet_resnet50": 32,
}
HEAVY = [n for n in ALL if "resnet" in n]
#: Run with -m slow (.ci/run runs them): the ResNet-50 models, and ResNet-34, whose layout
#: (BasicBlocks, stride 32) ResNet-18 checks in the default run.
SLOW = {n for n in HEAVY if "resnet50" in n} | {"unet_resnet34"}
#: Also slow in the spec and two-sizes tests: the ResNet-18 U-Net (its crops, gradient and
#: fusion tests stay in the default run).
SLOW_PLAIN = SLOW | {"unet_resnet18"}
# Small models checked fully in 2-D: (name, kwargs).
LIGHT = [
    ("tiny", {}),
    ("unet", {"base": 4}),  # the default's layout (and receptive field), narrower
    ("unet", {"depth": 3, "up": "transpose", "norm": "none"}),
    ("unet", {"depth": 2, "base": 4}),
]


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


@functools.lru_cache(maxsize=2)  # float64 ResNet50s are ~300 MB each: keep few alive
def _prepared(name: str, kw: str = "{}") -> TileModel:
    """An eval-mode float64 model with random BN statistics (shared by the RF tests)."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=3, **json.loads(kw))
    _randomize_bn(model)
    return model.double().eval()


@pytest.fixture(scope="module", autouse=True)
def _release_models() -> Iterator[None]:
    yield
    _prepared.cache_clear()


# -- registry and contract ------------------------------------------------------------------


def test_list_models_is_sorted_and_complete() -> None:
    smp = [f"smp.{arch}" for arch in smp_models.ARCHITECTURES]  # tested in test_smp.py
    assert list_models() == sorted(ALL + smp)


def test_unknown_model_lists_the_available_ones() -> None:
    with pytest.raises(ModelError, match=r"'nope'.*tiny, unet"):
        create_model("nope")


def test_unknown_option_is_named() -> None:
    with pytest.raises(ModelError, match=r"'depht'.*valid options: base, depth, norm, up"):
        create_model("unet", depht=3)


@pytest.mark.parametrize(
    "kwargs", [{"norm": "layer"}, {"up": "pixelshuffle"}, {"depth": 0}, {"base": "16"}]
)
def test_bad_option_value_is_a_model_error(kwargs: dict) -> None:
    with pytest.raises(ModelError, match=str(next(iter(kwargs.values())))):
        create_model("unet", **kwargs)


def test_bad_channels_are_rejected() -> None:
    with pytest.raises(ModelError, match="in_channels"):
        create_model("tiny", in_channels=0)


def test_models_read_no_weight_files(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"load_weights\(model, path\)"):
        create_model("tiny", weights=tmp_path / "w.pt")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PLAIN else n for n in ALL]
)
def test_spec_is_plain_data_and_rebuilds_the_model(name: str) -> None:
    kw = {"unet": {"depth": 3, "base": 8}, "tiny": {"width": 4}}.get(name, {})
    m = create_model(name, in_channels=4, num_classes=5, **kw)
    spec = json.loads(json.dumps(m.spec.to_dict()))
    rebuild = {k: spec[k] for k in ("name", "in_channels", "num_classes", "kwargs")}
    assert rebuild == {"name": name, "in_channels": 4, "num_classes": 5, "kwargs": kw}
    assert ModelSpec.from_dict(spec) == m.spec
    again = create_model(spec["name"], in_channels=4, num_classes=5, **spec["kwargs"])
    a, b = m.state_dict(), again.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert m.stride == (8 if name == "unet" else STRIDES[name])
    assert again.receptive_field == m.receptive_field
    assert m.per_pixel_norm is True
    assert not any(isinstance(x, nn.Linear) for x in m.modules()), "no dense layers"
    assert not any(isinstance(x, nn.AdaptiveAvgPool2d) for x in m.modules()), "no global pool"


def test_create_model_from_config() -> None:
    from tilenet.config import load_config

    cfg = load_config(None, ["model.name=unet", "model.kwargs.depth=2", "model.in_channels=1"])
    m = create_model_from_config(cfg.model)
    assert (m.stride, m.in_channels, m.num_classes) == (4, 1, cfg.model.num_classes)
    assert m.spec.kwargs == {"depth": 2}


def test_group_norm_is_flagged_as_not_per_pixel() -> None:
    assert create_model("unet", norm="group").per_pixel_norm is False
    assert create_model("unet", norm="batch").per_pixel_norm is True


# -- exactness: does a tile see the statistics the whole image sees? ---------------------------

# (layer on 4 channels, whether it mixes spatial positions at inference)
LAYERS = [
    (nn.BatchNorm2d(4), False),
    (nn.BatchNorm2d(4, track_running_stats=False), True),
    (nn.InstanceNorm2d(4), True),
    (nn.InstanceNorm2d(4, track_running_stats=True), False),
    (nn.GroupNorm(2, 4), True),
    (nn.LayerNorm([4, 8, 8]), True),
    (nn.LocalResponseNorm(3), False),  # across channels only
    (nn.AdaptiveAvgPool2d(1), True),
    (nn.AdaptiveMaxPool2d(1), True),
    (nn.ReLU(), False),
]


def _mixes_positions(layer: nn.Module) -> bool:
    """Whether changing one input pixel changes the output at another pixel (eval mode)."""
    # Fixed weights and input: with a random 1x1 conv, +5 at one pixel could lower every
    # channel there (negative weights) and leave a global max pool's output as it was
    # (AdaptiveMaxPool2d failed so once in CI).
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    net = nn.Sequential(conv, layer).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, :, 0, 0] += 5.0
    with torch.no_grad():
        a, b = net(x), net(y)
    if a.shape[-2:] != (8, 8):  # pooled to a smaller map: every output reads every pixel
        return not torch.equal(a, b)
    return not torch.equal(a[..., 4:, 4:], b[..., 4:, 4:])


@pytest.mark.parametrize(("layer", "mixes"), LAYERS, ids=lambda v: type(v).__name__)
def test_exactness_matches_what_the_layer_does(layer: nn.Module, mixes: bool) -> None:
    assert _mixes_positions(layer) is mixes
    exact, reason = exactness(nn.Sequential(nn.Conv2d(3, 4, 1), layer))
    assert exact is not mixes
    if mixes:
        assert reason is not None and reason.startswith(type(layer).__name__)
        assert reason.endswith(" at 1")
    else:
        assert reason is None


def test_exactness_names_the_first_layer_and_counts_the_rest() -> None:
    m = create_model("unet", depth=2, base=4, norm="group")
    exact, reason = exactness(m)
    assert exact is False and m.per_pixel_norm is False
    # 2 GroupNorms per conv block: stem, 2 down, 2 up blocks
    assert reason == "GroupNorm at stem.1 (and 9 more such layers)"
    assert (m.spec.exact, m.spec.exact_reason) == (False, reason)
    assert exactness(create_model("unet", depth=2, base=4)) == (True, None)


def test_exactness_attention_and_a_declared_global_norm() -> None:
    exact, reason = exactness(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)}))
    assert (exact, reason) == (False, "MultiheadAttention at attn")

    class Declared(nn.Sequential):
        per_pixel_norm = False  # e.g. a functional global normalisation in forward

    assert exactness(Declared(nn.Conv2d(3, 4, 1))) == (
        False,
        "Declared declares per_pixel_norm=False",
    )


# -- ModelSpec --------------------------------------------------------------------------------


def _spec(**kw: object) -> ModelSpec:
    base: dict = {"name": "tiny", "in_channels": 2, "num_classes": 3, "stride": 2}
    base["receptive_field"] = 4
    return ModelSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_spec_fills_defaults_and_is_frozen() -> None:
    import dataclasses

    s = _spec(mean=[1, 2], kwargs={"width": 4, "sizes": (1, 2)})
    assert s.mean == (1.0, 2.0) and s.std == (1.0, 1.0)
    assert s.class_names == ("class_0", "class_1", "class_2")
    assert s.kwargs == {"width": 4, "sizes": [1, 2]}  # plain data: tuples become lists
    assert s.exact is None and s.exact_reason is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.stride = 4  # type: ignore[misc]


def test_spec_round_trips_as_plain_data() -> None:
    s = _spec(mean=[0.5, 1.5], std=[2, 3], class_names=["a", "b", "c"], exact=False)
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["mean"] == [0.5, 1.5] and d["class_names"] == ["a", "b", "c"]
    assert ModelSpec.from_dict(d) == s
    assert ModelSpec.from_dict({**d, "future_key": 1}) == s  # unknown keys are ignored
    assert ModelSpec.coerce(s) is s
    assert ModelSpec.coerce(d) == s


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"in_channels": 0}, "in_channels must be a positive int, got 0"),
        ({"stride": "2"}, "stride must be a positive int, got '2'"),
        ({"num_classes": True}, "num_classes must be a positive int, got True"),
        ({"receptive_field": -1}, "receptive_field must be an int >= 0, got -1"),
        ({"mean": [0.0]}, "mean has 1 values for 2 input channels"),
        ({"std": [1.0, 0.0]}, "std must be positive"),
        ({"mean": ["a", "b"]}, "mean must be finite numbers, got 'a'"),
        ({"class_names": ["a"]}, "1 class_names for 3 classes"),
        ({"class_names": "abc"}, "class_names must be a list of str"),
        ({"kwargs": {"f": object}}, "is not plain data"),
        ({"exact": "yes"}, "exact must be true, false or null"),
        ({"name": ""}, "name must be a non-empty str"),
    ],
)
def test_bad_spec_values_are_one_line_model_errors(change: dict, message: str) -> None:
    with pytest.raises(ModelError, match=re.escape(message)) as info:
        _spec(**change)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match=re.escape(message)):
        ModelSpec.from_dict({**_spec().to_dict(), **change})


def test_spec_from_dict_names_missing_keys() -> None:
    d = _spec().to_dict()
    del d["stride"], d["receptive_field"]
    with pytest.raises(ModelError, match="missing 'stride', 'receptive_field'"):
        ModelSpec.from_dict(d)
    with pytest.raises(ModelError, match="must be a ModelSpec or a mapping, got list"):
        ModelSpec.coerce([1, 2])  # type: ignore[arg-type]


def test_spec_from_model() -> None:
    m = create_model("tiny", in_channels=2, num_classes=3, width=4)
    s = ModelSpec.from_model(m, mean=[10.0, 20.0], std=[2.0, 4.0], class_names=["a", "b", "c"])
    assert (s.name, s.stride, s.receptive_field, s.kwargs) == ("tiny", 2, 4, {"width": 4})
    assert s.mean == (10.0, 20.0) and s.class_names == ("a", "b", "c")
    assert (s.exact, s.exact_reason) == (True, None) and s.tilenet_version
    assert ModelSpec.from_model(m) == m.spec
    with pytest.raises(ModelError, match="class_names must be a list of str, got 'abc'"):
        ModelSpec.from_model(m, class_names="abc")
    with pytest.raises(ModelError, match="Conv2d is not a registry model"):
        ModelSpec.from_model(nn.Conv2d(2, 3, 1))


# -- forward passes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    # the ResNet-50 models (~8 s each) run with -m slow; their crop test runs them by default
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PLAIN else n for n in ALL],
)
def test_runs_on_cpu_at_two_sizes(name: str) -> None:
    s = STRIDES[name]
    m = create_model(name, in_channels=1, num_classes=3)
    with torch.no_grad():
        for h, w in ((2 * s, 3 * s), (4 * s, 2 * s)):
            y = m.eval()(torch.randn(1, 1, h, w))
            assert y.shape == (1, 3, h, w) and torch.isfinite(y).all()
        y = m.train()(torch.randn(2, 1, 2 * s, 2 * s))
        assert y.shape == (2, 3, 2 * s, 2 * s)


def test_input_not_a_multiple_of_the_stride_is_a_model_error() -> None:
    m = create_model("unet")
    with pytest.raises(ModelError, match=r"not a multiple of the model stride 16"):
        m(torch.randn(1, 3, 40, 48))
    with pytest.raises(ModelError, match=r"expected input \(N, 3, H, W\)"):
        m(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("name", ["tiny", "unet"])
def test_channels_last_and_bf16_autocast(name: str) -> None:
    m = create_model(name, in_channels=3, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(x)
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


# -- stride and receptive field ---------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_unet_receptive_field_matches_hand_derivation(depth: int) -> None:
    # Derived on paper per axis: stem 2 convs (+-2), per level a 2x2 pool (+2^(i-1) right)
    # and 2 convs (+-2^(i+1)); per decoder level bilinear x2 (-2J, +J) and 2 convs (+-2J),
    # J = 2^(i-1). Sum: 2^(depth+3) - 6 either side. A 2x2 transposed conv (-J, 0): 7*2^depth-5.
    bil = create_model("unet", depth=depth, base=2)
    assert bil.stride == 2**depth
    assert bil.analysis.interval == ((6 - 2 ** (depth + 3), 2 ** (depth + 3) - 6),) * 2
    tr = create_model("unet", depth=depth, base=2, up="transpose")
    assert tr.receptive_field == 7 * 2**depth - 5


def test_tiny_receptive_field_matches_hand_derivation() -> None:
    # conv3 (+-1), pool 2 (J=2, [-1, 2]), conv3 at J=2 ([-3, 4]), nearest x2 ([-4, 4]).
    m = create_model("tiny")
    assert (m.stride, m.receptive_field) == (2, 4)


def _grad_support(model: TileModel, x: torch.Tensor, cy: int, cx: int) -> tuple[int, ...]:
    x = x.clone().requires_grad_(True)
    model(x)[0, :, cy, cx].sum().backward()
    assert x.grad is not None
    g = x.grad.abs().sum(dim=(0, 1))
    ys, xs = torch.nonzero(g, as_tuple=True)
    return (int(ys.min()) - cy, int(ys.max()) - cy, int(xs.min()) - cx, int(xs.max()) - cx)


# tiny in 2-D by default; the U-Nets with -m slow (.ci/run runs them; ~6 s each): their crops
# stay here, and so does the U-Net's gradient bound along a thin strip
@pytest.mark.parametrize(
    ("name", "kwargs"), [*LIGHT[:1], *(pytest.param(*v, marks=pytest.mark.slow) for v in LIGHT[1:])]
)
def test_receptive_field_bounds_the_gradient_2d(name: str, kwargs: dict) -> None:
    m = _prepared(name, json.dumps(kwargs))
    s, rf = m.stride, m.receptive_field
    (ly, hy), (lx, hx) = m.analysis.interval
    size = ceil_to(2 * rf + 4 * s, s)
    x = torch.randn(1, 2, size, size, dtype=torch.float64)
    emp = [0, 0, 0, 0]
    for phase in (0, s - 1):  # interval is the union over positions within a stride cell
        c = size // 2 + phase
        got = _grad_support(m, x, c, c)
        emp = [min(emp[0], got[0]), max(emp[1], got[1]), min(emp[2], got[2]), max(emp[3], got[3])]
    assert ly <= emp[0] and emp[1] <= hy and lx <= emp[2] and emp[3] <= hx
    # The analytic value is not wildly larger than what the network really reads.
    assert max(-emp[0], emp[1], -emp[2], emp[3]) >= 0.5 * rf


def _crop_gap(
    model: TileModel, x: torch.Tensor, halo: int, axis: int, whole: torch.Tensor | None = None
) -> float:
    """Max |whole - crop| over the ``stride`` centre rows of a crop with ``halo`` context."""
    s = model.stride
    n = x.shape[2 + axis]
    centre = ceil_to((n - s) // 2, s)
    start = centre - halo  # crop origin: stride aligned, inside the image
    assert start > 0 and start % s == 0 and start + 2 * halo + s < n
    with torch.no_grad():
        if whole is None:
            whole = model(x)
        part = model(x.narrow(2 + axis, start, 2 * halo + s)).narrow(2 + axis, halo, s)
    return float((whole.narrow(2 + axis, centre, s) - part).abs().max())


def _short(rf: int, s: int) -> int:
    """A stride-aligned halo more than a stride short of the analytic reach."""
    return max(0, (rf - 1) // s * s - s)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    # the transposed-conv and depth-2 layouts: .ci/run (slow); the thin test covers every layout
    LIGHT[:2] + [pytest.param(*p, marks=pytest.mark.slow) for p in LIGHT[2:]],
)
def test_crop_with_halo_reproduces_the_whole_pass_2d(name: str, kwargs: dict) -> None:
    m = _prepared(name, json.dumps(kwargs))
    s, rf = m.stride, m.receptive_field
    halo = ceil_to(rf, s)
    size = 2 * halo + 5 * s
    x = torch.randn(1, 2, size, size, dtype=torch.float64)
    start = ceil_to((size - s) // 2, s) - halo
    with torch.no_grad():
        whole = m(x)[..., start + halo : start + halo + s, start + halo : start + halo + s]
        crop = x[..., start : start + 2 * halo + s, start : start + 2 * halo + s]
        part = m(crop)[..., halo : halo + s, halo : halo + s]
    assert float((whole - part).abs().max()) < 1e-4
    # The test can fail: a halo short of the reach changes the result (float64: exact is
    # bit-equal or ~1e-16, a missing far pixel gives far more).
    assert _crop_gap(m, x, _short(rf, s), axis=0) > 1e-12


@pytest.mark.parametrize(
    "name",
    # The ResNet-50 models run with -m slow (the default run's 4-minute budget).
    # ResNet-18 U-Net too (its BasicBlock layout: smp's resnet18 crop-mode test in the default run)
    ["unet", *(pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PLAIN else n for n in HEAVY)],
)
def test_crop_with_halo_reproduces_the_whole_pass_thin(name: str) -> None:
    m = _prepared(name)
    s, rf = m.stride, m.receptive_field
    assert s == STRIDES[name]
    halo = ceil_to(rf, s)
    x = torch.randn(1, 2, 2 * halo + 5 * s, 2 * s, dtype=torch.float64)
    with torch.no_grad():
        whole = m(x)
    assert _crop_gap(m, x, halo, axis=0, whole=whole) < 1e-4
    assert _crop_gap(m, x, _short(rf, s), axis=0, whole=whole) > 1e-12


@pytest.mark.parametrize(
    ("name", "axis"),
    [("unet", 0), *(pytest.param(n, a, marks=pytest.mark.slow) for n in HEAVY for a in (0, 1))],
)
def test_receptive_field_bounds_the_gradient_thin(name: str, axis: int) -> None:
    m = _prepared(name)
    s, rf = m.stride, m.receptive_field
    lo, hi = m.analysis.interval[axis]
    n = ceil_to(2 * rf + 4 * s, s)
    shape = (1, 2, n, 2 * s) if axis == 0 else (1, 2, 2 * s, n)
    x = torch.randn(shape, dtype=torch.float64)
    emp_lo = emp_hi = 0
    for phase in (0, s - 1):
        c = n // 2 + phase
        got = _grad_support(m, x, *((c, s) if axis == 0 else (s, c)))
        a, b = got[:2] if axis == 0 else got[2:]
        emp_lo, emp_hi = min(emp_lo, a), max(emp_hi, b)
    assert lo <= emp_lo and emp_hi <= hi
    assert max(-emp_lo, emp_hi) >= 0.8 * rf


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_crop_exact_along_the_other_axis(name: str) -> None:
    m = _prepared(name)
    halo = ceil_to(m.receptive_field, m.stride)
    x = torch.randn(1, 2, 2 * m.stride, 2 * halo + 5 * m.stride, dtype=torch.float64)
    assert _crop_gap(m, x, halo, axis=1) < 1e-4


def test_shift_by_a_stride_shifts_the_output() -> None:
    m = _prepared("unet", json.dumps({"depth": 2, "base": 4}))
    s, halo = m.stride, ceil_to(m.receptive_field, m.stride)
    x = torch.randn(1, 2, 2 * halo + 4 * s, 2 * halo + 4 * s, dtype=torch.float64)
    with torch.no_grad():
        a = m(x)[..., halo + s : -halo, halo : -halo - s]
        b = m(x[..., s:, :-s])[..., halo:-halo, halo:-halo]
    torch.testing.assert_close(a, b)


@pytest.mark.slow  # builds DeepLabV3-ResNet-50 twice (.ci/run runs it)
def test_deeplab_has_a_local_aspp_pooling_branch() -> None:
    m = create_model("deeplabv3_resnet50", num_classes=2)
    aspp = m.net.classifier[0]
    assert not any(isinstance(x, nn.AdaptiveAvgPool2d) for x in m.modules())
    # Reaches as far as the widest atrous conv (rate 36 at stride 8) and no farther.
    with_pool = m.receptive_field
    without = create_model("deeplabv3_resnet50", num_classes=2, pool_radius=0)
    assert without.receptive_field == with_pool
    assert len(without.net.classifier[0].convs) == len(aspp.convs) - 1


class _GlobalPool(TileModel):
    def __init__(self) -> None:
        super().__init__(1, 1)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.pool(x)


class _AlignedCorners(TileModel):
    _stride_hint = 2

    def __init__(self) -> None:
        super().__init__(1, 1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.pool(x))


@pytest.mark.parametrize(
    ("cls", "reason", "rf"),
    [
        (_GlobalPool, "AdaptiveAvgPool2d at pool", 1),
        (_AlignedCorners, "align_corners=True at up", 3),
    ],
)
def test_global_layers_make_a_model_not_exact(cls: type[TileModel], reason: str, rf: int) -> None:
    # A global pooling or a resize whose sampling depends on the image size: the receptive
    # field is that of the local paths, and exactness() names the layer.
    model = cls()
    model.analysis = analyze(model)
    assert model.analysis.receptive_field == rf
    exact, why = exactness(model)
    assert not exact and why is not None and reason in why


# -- memory estimate ----------------------------------------------------------------------------


def test_memory_estimate_scales_and_orders_sensibly() -> None:
    m = create_model("unet")
    est = functools.partial(model_memory, m)
    a = est(tile=256, batch=1)
    b = est(tile=256, batch=2)
    c = est(tile=512, batch=1)
    assert b["activation_bytes"] == 2 * a["activation_bytes"]
    assert c["activation_bytes"] == 4 * a["activation_bytes"]
    half = est(tile=256, batch=1, precision="bf16")
    assert half["activation_bytes"] < 0.55 * a["activation_bytes"]
    train = est(tile=256, batch=1, training=True)
    assert train["activation_bytes"] > 2 * a["activation_bytes"]
    # The seeds' rule of thumb (every map kept, plus as much again) bounds the graph estimate.
    assert train["activation_bytes"] <= train["seed_rule_bytes"]
    assert a["parameters"] == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="multiple of the model stride 16"):
        est(tile=100)


# -- inference preparation: BatchNorm folded into convolutions ---------------------------------


@pytest.mark.parametrize(  # the ResNet-18 U-Net (~6 s) with -m slow: same folding, more layers
    "name", ["tiny", "unet", pytest.param("unet_resnet18", marks=pytest.mark.slow)]
)
def test_conv_bn_fusion_keeps_the_output(name: str) -> None:
    from tilenet.models.fuse import fuse_conv_bn

    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=3).eval()
    _randomize_bn(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 2 * STRIDES[name] + 64, 2 * STRIDES[name] + 32)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_conv_bn(model)
        out = model(x)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fused > 0 and left == n_bn - fused
    assert left == 0  # every BatchNorm of these models follows a conv of its own
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), float((out - ref).abs().max())


class _SharedBN(nn.Module):
    """A BatchNorm module called twice, a conv whose output also feeds a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)
        self.bn_c = nn.BatchNorm2d(4)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.a(x))
        y = self.bn(self.b(y))  # shared: fusing either pair would change the other
        z = self.c(y)
        return self.bn_c(z) + z  # z has two users: not fusable either

    forward = _forward_impl


def test_conv_bn_fusion_leaves_shared_modules_alone() -> None:
    from tilenet.models.fuse import fuse_conv_bn

    model = _SharedBN().eval()
    _randomize_bn(model)
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        ref = model(x)
        assert fuse_conv_bn(model) == 0
        assert torch.equal(model(x), ref)
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn_c, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(model.train())


def test_a_second_model_of_an_architecture_fuses_without_tracing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The conv-BN pairs come from one fx trace per architecture; a second model of it (as
    each checkpoint load builds) fuses the same pairs to the same output without a trace."""
    from torch import fx

    from tilenet.models.fuse import fuse_conv_bn

    first = create_model("unet", in_channels=3, num_classes=2, depth=2, base=4).eval()
    n = fuse_conv_bn(first)
    second = create_model("unet", in_channels=3, num_classes=2, depth=2, base=4).eval()
    other = create_model("tiny", in_channels=2, num_classes=5).eval()
    _randomize_bn(second)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        ref = second(x)

    def no_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced again")

    monkeypatch.setattr(fx.Tracer, "trace", no_trace)
    with torch.no_grad():
        assert fuse_conv_bn(second) == n > 0
        assert torch.allclose(second(x), ref, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in second.modules())
    # Another architecture is traced: here the trace fails, so nothing is fused.
    assert fuse_conv_bn(other) == 0


def test_a_model_without_batch_norm_is_not_traced() -> None:
    """Nothing to fold, nothing traced: a module wrapping another runtime (as the ONNX
    backend does: its session crashed on a tracing proxy) is never called by the fusion."""
    from tilenet.models.fuse import fuse_conv_bn

    class Wrapper(nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Wrapper.calls += 1
            return torch.from_numpy(x.numpy())  # a proxy has no numpy()

    assert fuse_conv_bn(Wrapper().eval()) == 0 and Wrapper.calls == 0


def test_an_architecture_is_traced_once_per_process() -> None:
    """Building the same architecture again reuses its traced analysis and exactness (tracing
    is most of the cost of building a small model); other arguments are traced anew."""
    a = create_model("unet", in_channels=3, num_classes=2, depth=2, base=4)
    b = create_model("unet", in_channels=3, num_classes=2, depth=2, base=4)
    c = create_model("unet", in_channels=3, num_classes=2, depth=3, base=4)
    assert b.analysis is a.analysis and b.spec == a.spec
    assert c.analysis is not a.analysis
    assert c.receptive_field > a.receptive_field and c.stride > a.stride
    assert b.state_dict().keys() == a.state_dict().keys()
