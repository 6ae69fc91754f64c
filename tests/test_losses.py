"""Losses against values computed by hand (math module only, no torch in the expectation)."""

import math

import pytest
import torch

from iterate import losses


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_hand_values():
    rc = torch.tensor([2.0, 0.0, -1.0])
    rr = torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326; -log sigmoid(0) = log 2; -log sigmoid(-2) = 2.12693
    expected = [0.3132617, math.log(2), 2.1269280]
    assert losses.bradley_terry(rc, rr).tolist() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_gradient_pushes_margin_up():
    rc = torch.tensor([0.5], requires_grad=True)
    rr = torch.tensor([0.5], requires_grad=True)
    losses.bradley_terry(rc, rr).sum().backward()
    assert rc.grad.item() == pytest.approx(-0.5)  # -(1 - sigmoid(0))
    assert rr.grad.item() == pytest.approx(0.5)


# policy chosen/rejected, ref chosen/rejected: h = (-1 - -2) - (-3 - -2.5) = 1.5
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))


def test_dpo_sigmoid_hand_value():
    loss, cr, rr = losses.dpo(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(-logsig(0.15), abs=1e-6)  # 0.62096
    assert loss.item() == pytest.approx(0.6209, abs=1e-4)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.05)


def test_cdpo_label_smoothing_hand_value():
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * logsig(0.15) - 0.2 * logsig(-0.15), abs=1e-6)


def test_ipo_hand_value():
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, loss="ipo")
    assert loss.item() == pytest.approx((1.5 - 5.0) ** 2)  # (h - 1/(2 beta))^2 = 12.25


def test_hinge_hand_values():
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=0.1, loss="hinge")
    assert loss.item() == pytest.approx(1 - 0.15)
    loss, _, _ = losses.dpo(PC, PR, RC, RR, beta=1.0, loss="hinge")
    assert loss.item() == 0.0  # margin beyond 1: no loss


def test_dpo_unknown_loss():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        losses.dpo(PC, PR, RC, RR, beta=0.1, loss="kto")


def test_nll_masks_prompt_and_padding():
    token_logps = torch.tensor([[-9.0, -1.0, -2.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert losses.nll(token_logps, mask).tolist() == pytest.approx([1.5, 1.0])
