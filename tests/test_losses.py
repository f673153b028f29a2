import math

import numpy as np
import pytest
import torch

from components.losses.classification import balanced_class_weights
from components.losses.contrastive import ContrastiveLoss, DoubleMarginContrastiveLoss, double_margin_contrastive
from tests.conftest import on_pairs

A = torch.tensor([[1.0, 0.0]])
B = torch.tensor([[0.0, 1.0]])  # ‖A − B‖ = √2


def test_positive_pair_beyond_pos_margin_hand_computed():
    loss = double_margin_contrastive(A, B, torch.tensor([1]), pos_margin=0.5, neg_margin=1.8)
    assert loss.item() == pytest.approx(0.5 * (math.sqrt(2) - 0.5) ** 2, rel=1e-6)  # 0.417893


def test_negative_pair_within_neg_margin_hand_computed():
    loss = double_margin_contrastive(A, B, torch.tensor([0]), pos_margin=0.5, neg_margin=2.0)
    assert loss.item() == pytest.approx(0.5 * (2.0 - math.sqrt(2)) ** 2, rel=1e-6)  # 0.171573


def test_pairs_inside_their_margins_cost_nothing():
    y = torch.tensor([1, 0])
    a, b = torch.cat([A, A]), torch.cat([A * 0.9 + B * 0.1, B])  # positive at d≈0.14, negative at d=√2
    assert double_margin_contrastive(a, b, y, pos_margin=0.2, neg_margin=1.2).item() == 0.0


def test_batch_loss_is_the_mean_of_pair_losses():
    y = torch.tensor([1, 0])
    both = double_margin_contrastive(torch.cat([A, A]), torch.cat([B, B]), y, 0.5, 2.0)
    expected = (0.5 * (math.sqrt(2) - 0.5) ** 2 + 0.5 * (2.0 - math.sqrt(2)) ** 2) / 2
    assert both.item() == pytest.approx(expected, rel=1e-6)


def test_single_margin_is_double_margin_with_zero_pos_margin():
    a, b, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 2, (8,))
    assert on_pairs(ContrastiveLoss(1.0), a, b, y).item() == pytest.approx(on_pairs(DoubleMarginContrastiveLoss(0.0, 1.0), a, b, y).item())
    # the single-margin loss still pulls a positive pair that the double-margin loss leaves alone
    close = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.95, 0.3122]])
    assert on_pairs(ContrastiveLoss(1.0), *close, torch.tensor([1])).item() > 0
    assert on_pairs(DoubleMarginContrastiveLoss(0.5, 1.0), *close, torch.tensor([1])).item() == 0


@pytest.mark.parametrize("y, closer", [(1, True), (0, False)])
def test_gradient_step_moves_pairs_the_right_way(y, closer):
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0]])
    before = (a - b).norm().item()
    double_margin_contrastive(a, b, torch.tensor([y]), pos_margin=0.2, neg_margin=1.8).backward()
    after = (a.detach() - 0.1 * a.grad - b).norm().item()
    assert (after < before) == closer


def test_margins_must_be_ordered():
    with pytest.raises(ValueError, match="pos_margin < neg_margin"):
        double_margin_contrastive(A, B, torch.tensor([1]), pos_margin=1.0, neg_margin=0.5)


def test_balanced_class_weights():
    w = balanced_class_weights(np.array([0, 0, 0, 1]), 2)
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    with pytest.raises(ValueError, match="without training images"):
        balanced_class_weights(np.array([0, 0]), 2)
