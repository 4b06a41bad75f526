"""Losses (CE, Dice, sum; weights, ignore_index) and confusion-matrix metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilenet.errors import ConfigError, ShapeMismatchError
from tilenet.geometry import Window
from tilenet.train.losses import CombinedLoss, DiceLoss, build_loss
from tilenet.train.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    score_class_map,
    scores_from_confusion,
)


# -- metrics -----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 5),
    n=st.integers(0, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_confusion_matrix_matches_counting(k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, k, n)
    target = rng.choice([*range(k), 255], n)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k).numpy()
    expected = np.zeros((k, k), np.int64)
    for p, t in zip(pred, target, strict=True):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == (target != 255).sum()


def test_confusion_ignore_index_none_counts_in_range_labels_only() -> None:
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 7]), 2, ignore_index=None)
    assert cm.tolist() == [[1, 0], [0, 1]]


def test_scores_dice_iou_values() -> None:
    # class 0: tp 2, fp 1, fn 0 ; class 1: tp 1, fp 0, fn 1 ; class 2 absent everywhere
    cm = torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 0]])
    s = scores_from_confusion(cm, class_names=["bg", "a", "b"])
    assert s["dice"][0] == pytest.approx(4 / 5)
    assert s["dice"][1] == pytest.approx(2 / 3)
    assert s["iou"][1] == pytest.approx(1 / 2)
    assert s["dice"][2] is None and s["iou"][2] is None
    # mean over foreground classes that have a score: only class 1
    assert s["mean_dice"] == pytest.approx(2 / 3)
    assert s["mean_iou"] == pytest.approx(1 / 2)
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["pixels"] == 4


def test_scores_perfect_and_empty() -> None:
    target = torch.tensor([[0, 1], [2, 2]])
    s = scores_from_confusion(confusion_matrix(target, target, 3))
    assert s["dice"] == [1.0, 1.0, 1.0] and s["mean_dice"] == 1.0
    empty = scores_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert empty["mean_dice"] is None and empty["accuracy"] is None


def test_accumulator_equals_one_matrix_over_everything() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, :2] = 255
    acc = ConfusionMatrix(3)
    for i in range(4):
        acc.update(logits[i : i + 1], target[i : i + 1])
    whole = confusion_matrix(logits.argmax(1), target, 3)
    assert torch.equal(acc.matrix, whole)
    acc2 = ConfusionMatrix(3)
    acc2.update(logits.argmax(1), target)  # class maps work too
    assert torch.equal(acc2.matrix, whole)


# -- losses ------------------------------------------------------------------------------------
def _logits_for(target: torch.Tensor, k: int, scale: float = 20.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * scale - scale / 2


def test_dice_loss_perfect_near_zero_and_wrong_near_one() -> None:
    target = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    dice = DiceLoss(3, smooth=1e-6)
    assert float(dice(_logits_for(target, 3), target)) < 1e-4
    wrong = (target + 1) % 3
    assert float(dice(_logits_for(wrong, 3), target)) > 0.99


def test_ignored_pixels_do_not_matter() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[:, :3] = 255
    a = torch.randn(2, 3, 8, 8, generator=g)
    b = a.clone()
    b[:, :, :3] = torch.randn(2, 3, 3, 8, generator=g) * 50  # change only ignored pixels
    for name in ("ce", "dice", "ce+dice"):
        loss = build_loss(name, num_classes=3, ignore_index=255)
        assert torch.allclose(loss(a, target), loss(b, target)), name
    # the gradient at ignored pixels is exactly zero
    x = a.clone().requires_grad_(True)
    build_loss("ce+dice", num_classes=3)(x, target).backward()
    assert x.grad is not None
    assert float(x.grad[:, :, :3].abs().max()) == 0.0
    assert float(x.grad[:, :, 3:].abs().max()) > 0.0


def test_all_ignored_gives_zero_not_nan() -> None:
    target = torch.full((1, 4, 4), 255)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = build_loss("ce+dice", num_classes=2)(x, target)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_ce_plus_dice_is_the_sum() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.randint(0, 3, (2, 8, 8), generator=g)
    both = build_loss("ce+dice", num_classes=3)
    assert isinstance(both, CombinedLoss)
    ce = build_loss("ce", num_classes=3)
    dice = build_loss("dice", num_classes=3)
    assert torch.allclose(both(x, t), ce(x, t) + dice(x, t))
    assert torch.allclose(ce(x, t), torch.nn.functional.cross_entropy(x, t))


def test_class_weights_change_the_loss() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.randint(0, 3, (2, 8, 8), generator=g)
    w = [0.1, 1.0, 5.0]
    ce = build_loss("ce", num_classes=3, class_weights=w)
    ref = torch.nn.functional.cross_entropy(x, t, weight=torch.tensor(w))
    assert torch.allclose(ce(x, t), ref)
    plain = build_loss("dice", num_classes=3)(x, t)
    weighted = build_loss("dice", num_classes=3, class_weights=w)(x, t)
    assert not torch.allclose(plain, weighted)
    # only class 2 counts when the others weigh 0
    only2 = build_loss("dice", num_classes=3, class_weights=[0, 0, 1])(x, t)
    per_class = DiceLoss(3)
    p = torch.softmax(x, 1)[:, 2]
    m = (t == 2).float()
    expected = 1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1)
    assert torch.allclose(only2, expected)
    assert per_class.weight.sum() == pytest.approx(1.0)


def test_bad_loss_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'focal'"):
        build_loss("focal", num_classes=2)
    with pytest.raises(ConfigError, match="one weight per class"):
        build_loss("ce", num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="not all 0"):
        build_loss("ce", num_classes=2, class_weights=[0.0, 0.0])


def test_loss_under_bf16_autocast_is_float32_and_finite() -> None:
    x = torch.randn(2, 3, 8, 8)
    t = torch.randint(0, 3, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_loss("ce+dice", num_classes=3)(x.bfloat16(), t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


class _LabelImage:
    """The part of a LazyImage that score_class_map reads: shape and read(window)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.shape = (*labels.shape, 1)
        self._a = labels[..., None]

    def read(self, window: Window) -> np.ndarray:
        return self._a[window.slices]


@pytest.mark.parametrize("block", [None, 7, (5, 13)])
def test_score_class_map_blocks_equal_whole_image(block: object) -> None:
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 3, (23, 31)).astype(np.uint8)
    true = rng.integers(0, 3, (23, 31)).astype(np.uint8)
    true[::4, ::3] = 255
    got = score_class_map(pred, _LabelImage(true), 3, block=block)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.confusion, confusion_matrix(pred, true, 3).numpy())
    valid = true != 255
    pf, tf = (pred > 0) & valid, (true > 0) & valid
    assert got.foreground == (int((pf & tf).sum()), int(pf.sum()), int(tf.sum()))
    assert got.foreground_dice == 2 * (pf & tf).sum() / (pf.sum() + tf.sum())
    with pytest.raises(ShapeMismatchError, match="23x30"):
        score_class_map(pred[:, :30], _LabelImage(true), 3)


def test_confusion_matrix_accepts_read_only_numpy_blocks() -> None:
    # A label file decoded in place gives read-only arrays; torch warns on those (an error
    # under this suite's warning filter), so evaluation on such files failed.
    pred = np.array([0, 1, 1, 2], dtype=np.uint8)
    target = np.array([0, 1, 2, 255], dtype=np.uint8)
    pred.flags.writeable = False
    target.flags.writeable = False
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


@pytest.mark.parametrize("name", ["ce", "dice", "ce+dice"])
def test_label_255_is_ignored_whatever_the_ignore_index(name: str) -> None:
    """train.ignore_index=0 ("class 0 is unlabelled") on data whose no-label pixels are 255
    (vector labels outside every polygon, nodata, augmentation's fill): those pixels count
    for nothing, as the ignore index's own do, instead of failing as an out-of-range class."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 7))
    target[0, :2] = 255
    loss = build_loss(name, num_classes=3, ignore_index=0)
    got = loss(logits, target)
    want = loss(logits, torch.where(target == 255, 0, target))
    assert torch.isfinite(got) and torch.allclose(got, want)
    got.backward()
    assert logits.grad is not None and not bool(logits.grad[0, :, :2].any())
