import math

import pytest
import torch

from mtlfast.metrics import accuracy, delta_m, mae


def test_accuracy_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 1.0]])
    target = torch.tensor([0, 2, 2, 1])
    assert accuracy(logits, target) == pytest.approx(0.5)


def test_mae_hand_computed_with_scale():
    pred = torch.tensor([[1.0], [2.0], [4.0]])
    target = torch.tensor([1.5, 2.0, 1.0])
    assert mae(pred, target) == pytest.approx((0.5 + 0.0 + 3.0) / 3)
    assert mae(pred, target, scale=2.0) == pytest.approx(2 * 3.5 / 3)


def test_delta_m_hand_computed_mixed_directions():
    # a: accuracy 0.9 vs 0.8 -> -(0.1/0.8) = -0.125; b: MAE 2.0 vs 2.5 -> -0.5/2.5 = -0.2.
    got = delta_m({"a": 0.9, "b": 2.0}, {"a": 0.8, "b": 2.5}, {"a": True, "b": False})
    assert got == pytest.approx(100 * (-0.125 - 0.2) / 2)


def test_delta_m_worse_is_positive_and_equal_is_zero():
    hib = {"x": True, "y": False, "z": False}
    base = {"x": 0.5, "y": 1.0, "z": 4.0}
    assert delta_m(base, base, hib) == 0.0
    # x: -(0.4-0.5)/0.5 = +0.2 ; y: (1.3-1)/1 = +0.3 ; z: (4-4)/4 = 0
    assert delta_m({"x": 0.4, "y": 1.3, "z": 4.0}, base, hib) == pytest.approx(100 * 0.5 / 3)


def test_delta_m_ignores_tasks_not_named():
    got = delta_m({"a": 1.0, "extra": 9.0}, {"a": 2.0, "extra": 1.0}, {"a": False})
    assert got == pytest.approx(-50.0)


@pytest.mark.parametrize("bad", [0.0, math.inf, math.nan])
def test_delta_m_rejects_bad_baseline(bad):
    with pytest.raises(ValueError, match="baseline of task 'a'"):
        delta_m({"a": 1.0}, {"a": bad}, {"a": True})


def test_delta_m_missing_task():
    with pytest.raises(ValueError, match="'b' is missing"):
        delta_m({"a": 1.0}, {"a": 1.0, "b": 1.0}, {"a": True, "b": True})


def test_bad_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="prediction must match"):
        mae(torch.zeros(3, 2), torch.zeros(3))
