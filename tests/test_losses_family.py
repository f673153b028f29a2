import math

import pytest
import torch
from torch.nn import functional as F

from components.losses.contrastive import ContrastiveLoss, DoubleMarginContrastiveLoss, double_margin_contrastive
from components.losses.triplet import BatchHardTripletLoss, TripletLoss, batch_hard_triplet_loss, triplet_margin_loss
from components.losses.verification import NegativeRatioSchedule, SiameseIdVerLoss, VerificationHead, square_difference
from tests.conftest import on_pairs

A = torch.tensor([[1.0, 0.0]])
B = torch.tensor([[0.0, 1.0]])  # ‖A − B‖ = √2


# --- contrastive: plain hinge vs squared hinge ---------------------------------------------------------------------

def test_plain_contrastive_hand_computed():
    pos = double_margin_contrastive(A, B, torch.tensor([1]), pos_margin=0.5, neg_margin=2.0, squared=False)
    neg = double_margin_contrastive(A, B, torch.tensor([0]), pos_margin=0.5, neg_margin=2.0, squared=False)
    assert pos.item() == pytest.approx(0.5 * (math.sqrt(2) - 0.5), rel=1e-6)  # ½·0.914214 = 0.457107
    assert neg.item() == pytest.approx(0.5 * (2.0 - math.sqrt(2)), rel=1e-6)  # ½·0.585786 = 0.292893


def test_plain_vs_squared_contrastive():
    # hinge 0.914 < 1: squaring shrinks it (0.417893 < 0.457107); hinge 2.586 > 1: squaring grows it
    y = torch.tensor([1])
    assert on_pairs(DoubleMarginContrastiveLoss(0.5, 2.0), A, B, y) < on_pairs(DoubleMarginContrastiveLoss(0.5, 2.0, squared=False), A, B, y)
    far = torch.tensor([[4.0, 0.0]])  # d(far, B) = √17 ≈ 4.123, hinge over m₊ = 0 is 4.123
    assert on_pairs(ContrastiveLoss(5.0), far, B, y).item() == pytest.approx(0.5 * 17, rel=1e-6)
    assert on_pairs(ContrastiveLoss(5.0, squared=False), far, B, y).item() == pytest.approx(0.5 * math.sqrt(17), rel=1e-6)


def test_default_stays_squared():
    a, b, y = torch.randn(6, 3), torch.randn(6, 3), torch.randint(0, 2, (6,))
    assert on_pairs(DoubleMarginContrastiveLoss(0.2, 1.0), a, b, y) == double_margin_contrastive(a, b, y, 0.2, 1.0, squared=True)
    assert on_pairs(ContrastiveLoss(1.0), a, b, y) == double_margin_contrastive(a, b, y, 0.0, 1.0, squared=True)


@pytest.mark.parametrize("y, closer", [(1, True), (0, False)])
def test_plain_contrastive_gradient_direction(y, closer):
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    before = (a - B).norm().item()
    double_margin_contrastive(a, B, torch.tensor([y]), pos_margin=0.2, neg_margin=1.8, squared=False).backward()
    after = (a.detach() - 0.1 * a.grad - B).norm().item()
    assert (after < before) == closer


# --- triplet ------------------------------------------------------------------------------------------------------

def test_triplet_hand_computed():
    anchor = torch.zeros(2, 2)
    positive = torch.tensor([[3.0, 4.0], [3.0, 4.0]])  # d(a, p) = 5
    negative = torch.tensor([[6.0, 8.0], [0.0, 2.0]])  # d(a, n) = 10, then 2
    # max(0, 5 − 10 + 1) = 0 and max(0, 5 − 2 + 1) = 4 → mean 2
    assert triplet_margin_loss(anchor, positive, negative, margin=1.0).item() == pytest.approx(2.0)
    assert TripletLoss(1.0)(anchor, positive, negative).item() == pytest.approx(2.0)


def test_triplet_gradient_step_pulls_positive_pushes_negative():
    a = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    n = torch.tensor([[0.0, 1.5]], requires_grad=True)
    triplet_margin_loss(a, p, n, margin=1.0).backward()  # 1 − 1.5 + 1 = 0.5 > 0: active
    assert (a - (p.detach() - 0.1 * p.grad)).norm() < 1.0
    assert (a - (n.detach() - 0.1 * n.grad)).norm() > 1.5


# 1-D points (second coordinate 0): class 0 at 0, 1, 3; class 1 at 4, 10
X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [4.0, 0.0], [10.0, 0.0]])
Y = torch.tensor([0, 0, 0, 1, 1])


def test_batch_hard_hand_computed():
    # anchor: farthest positive, closest negative, hinge with m = 0.5
    # 0: d(0,3)=3, d(0,4)=4 → −0.5 → 0      1: d(1,3)=2, d(1,4)=3 → 0
    # 3: d(3,0)=3, d(3,4)=1 → 2.5            4: d(4,10)=6, d(4,3)=1 → 5.5      10: d(10,4)=6, d(10,3)=7 → 0
    assert batch_hard_triplet_loss(X, Y, margin=0.5).item() == pytest.approx(8.0 / 5, rel=1e-6)
    assert BatchHardTripletLoss(0.5)(X, Y).item() == pytest.approx(8.0 / 5, rel=1e-6)


def test_batch_hard_picks_farthest_positive_and_closest_negative():
    hardest_pos, hardest_neg = [2, 2, 0, 4, 3], [3, 3, 3, 2, 2]  # by hand from the distances above
    expected = triplet_margin_loss(X, X[hardest_pos], X[hardest_neg], margin=0.5)
    assert batch_hard_triplet_loss(X, Y, margin=0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    x = X.clone().requires_grad_(True)
    batch_hard_triplet_loss(x, Y, margin=0.5).backward()
    assert torch.all(x.grad[1] == 0)  # the point at 1 is never the hardest of an active anchor


def test_batch_hard_skips_anchors_without_positive_and_needs_one():
    lone = torch.cat([X, torch.tensor([[100.0, 0.0]])])  # a single-image class: no positive, far from everyone
    assert batch_hard_triplet_loss(lone, torch.tensor([0, 0, 0, 1, 1, 2]), 0.5).item() == pytest.approx(8.0 / 5, rel=1e-6)
    with pytest.raises(ValueError, match="no anchor"):
        batch_hard_triplet_loss(X[:3], torch.tensor([0, 1, 2]), 0.5)
    with pytest.raises(ValueError, match="no anchor"):
        batch_hard_triplet_loss(X[:3], torch.tensor([0, 0, 0]), 0.5)


def test_batch_hard_gradient_step_separates_classes():
    x = X.clone().requires_grad_(True)
    batch_hard_triplet_loss(x, Y, margin=0.5).backward()
    stepped = x.detach() - 0.1 * x.grad
    # anchor 3 → positive 0 pulled in, negative 4 pushed out; anchor 4 → positive 10 pulled in
    assert (stepped[2] - stepped[0]).norm() < 3 and (stepped[2] - stepped[3]).norm() > 1
    assert (stepped[3] - stepped[4]).norm() < 6


# --- Siamese identification + verification ---------------------------------------------------------------------------

def test_verification_head_shapes_and_square_layer():
    f1, f2 = torch.randn(4, 8), torch.randn(4, 8)
    head = VerificationHead(8)
    assert head(f1, f2).shape == (4, 2)
    assert torch.equal(square_difference(f1, f1), torch.zeros(4, 8))
    assert torch.allclose(head(f1, f1), head.fc.bias.expand(4, 2))  # s = 0 leaves only the bias
    assert torch.equal(square_difference(torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])), torch.tensor([[4.0, 9.0]]))


def _zeroed(loss: SiameseIdVerLoss) -> SiameseIdVerLoss:
    for p in loss.parameters():
        torch.nn.init.zeros_(p)
    return loss


def test_siamese_loss_hand_computed_with_zero_weights():
    # all logits 0: CE over 2 classes = ln 2, over 3 classes = ln 3 → 1·ln 2 + 0.5·(ln 3 + ln 3) = ln 6
    loss = _zeroed(SiameseIdVerLoss(embedding_size=4, num_classes=3))
    f1, f2 = torch.randn(5, 4), torch.randn(5, 4)
    value = on_pairs(loss, f1, f2, torch.randint(0, 2, (5,)), torch.randint(0, 3, (5,)), torch.randint(0, 3, (5,)))
    assert value.item() == pytest.approx(math.log(6), rel=1e-6)


def test_siamese_loss_weights_are_1_05_05():
    torch.manual_seed(0)
    loss = SiameseIdVerLoss(embedding_size=4, num_classes=3)
    f1, f2, y, c1, c2 = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([1, 0, 1, 0, 0]), torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 2, 2, 1, 1])
    ver = F.cross_entropy(loss.verification(f1, f2), y)
    id1, id2 = F.cross_entropy(loss.identification(f1), c1), F.cross_entropy(loss.identification(f2), c2)
    assert on_pairs(loss, f1, f2, y, c1, c2).item() == pytest.approx((1.0 * ver + 0.5 * id1 + 0.5 * id2).item(), rel=1e-6)
    weighted = SiameseIdVerLoss(4, 3, ver_weight=2.0, id_weight=0.0)
    weighted.load_state_dict(loss.state_dict())
    assert on_pairs(weighted, f1, f2, y, c1, c2).item() == pytest.approx(2.0 * ver.item(), rel=1e-6)
    assert {n for n, _ in loss.named_parameters()} == {"verification.fc.weight", "verification.fc.bias", "identification.weight", "identification.bias"}


@pytest.mark.parametrize("y, closer", [(1, True), (0, False)])
def test_siamese_gradient_direction(y, closer):
    loss = _zeroed(SiameseIdVerLoss(embedding_size=2, num_classes=2))  # zero classifier: no identification gradient on f
    with torch.no_grad():
        loss.verification.fc.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))  # "different" logit grows with s
    f1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    on_pairs(loss, f1, B, torch.tensor([y]), torch.tensor([0]), torch.tensor([1])).backward()
    assert ((f1.detach() - 0.1 * f1.grad - B).norm() < (A - B).norm()) == closer


def test_negative_ratio_schedule():
    s = NegativeRatioSchedule()
    assert s.ratio(1) == 1.0
    assert s.ratio(2) == pytest.approx(1.01) and s.ratio(3) == pytest.approx(1.0201)
    assert s.ratio(140) == pytest.approx(1.01 ** 139) and s.ratio(140) < 4.0  # 1.01^139 ≈ 3.98
    assert s.ratio(141) == 4.0 and s.ratio(500) == 4.0  # 1.01^140 ≈ 4.02: capped
    assert NegativeRatioSchedule(start=2.0, growth=2.0, max_ratio=5.0).ratio(2) == 4.0
    with pytest.raises(ValueError, match="from 1"):
        s.ratio(0)


def test_without_indices_a_pair_loss_takes_every_pair_of_the_batch():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1])
    pairs = [(0, 1, 1), (0, 2, 0), (1, 2, 0)]  # (i, j, same) of every i < j
    a, b, y = (torch.tensor(v) for v in zip(*pairs))
    expected = double_margin_contrastive(x[a], x[b], y, 0.2, 1.0)
    assert DoubleMarginContrastiveLoss(0.2, 1.0)(x, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_triplet_loss_given_triplets_uses_them_and_pairs_make_triplets():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([3]))
    expected = triplet_margin_loss(x[[0]], x[[1]], x[[3]], margin=0.5)
    assert BatchHardTripletLoss(0.5)(x, labels, triplets).item() == pytest.approx(expected.item(), rel=1e-6)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([3]))  # shared anchor 0
    assert BatchHardTripletLoss(0.5)(x, labels, pairs).item() == pytest.approx(expected.item(), rel=1e-6)
