"""The coupled clusters loss (Liu et al. 2016): a hand-computed value on a tiny 2-D set, the direction of its
gradient (positives pulled towards their centre, the nearest negative pushed away), zero once the margin is met, the
clusters of an index tuple, and its params (P×K batches)."""

import pytest
import torch

from components.losses import LOSSES
from components.losses.coupled_clusters import CoupledClustersLoss, coupled_clusters_loss
from components.registry import Spec
from pipelines.params import ParamsError, load_params
from tests.conftest import REPO

# class 0: a triangle whose centre is (1, 1); class 1: two points whose centre is (6, 1)
X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [5.0, 1.0], [7.0, 1.0]])
Y = torch.tensor([0, 0, 0, 1, 1])
# cluster 0: ‖f_p − c‖² = 2, 2, 4; the negative nearest to (1, 1) is (5, 1), at 16
# cluster 1: ‖f_p − c‖² = 1, 1; the negative nearest to (6, 1) is (2, 0), at 17
# α = 15: L_0 = (½·1 + ½·1 + ½·3) / 3 = 5/6, L_1 = 0 (1 − 17 + 15 < 0), L = (5/6 + 0) / 2 = 5/12


def test_value_matches_the_hand_computed_one():
    assert CoupledClustersLoss(15.0)(X, Y).item() == pytest.approx(5 / 12, rel=1e-6)
    # α = 17: L_0 = (½·3 + ½·3 + ½·5) / 3 = 11/6, L_1 = (½·1 + ½·1) / 2 = ½
    assert CoupledClustersLoss(17.0)(X, Y).item() == pytest.approx((11 / 6 + 1 / 2) / 2, rel=1e-6)
    assert LOSSES.build(Spec("coupled_clusters", {"margin": 15.0}))(X, Y, None).item() == pytest.approx(5 / 12, rel=1e-6)


def test_positives_are_pulled_to_their_centre_and_the_nearest_negative_pushed_away():
    x = X.clone().requires_grad_(True)
    CoupledClustersLoss(15.0)(x, Y).backward()
    centre = torch.tensor([1.0, 1.0])
    step = -x.grad  # the direction gradient descent moves each embedding
    # the centre is a constant of the back-propagation (the paper's gradients): ∂L/∂f_p = (f_p − c) / (G·|P|),
    # ∂L/∂f_n* = −Σ_active (f_n* − c) / (G·|P|), with G = 2 clusters, |P| = 3, all three positives active
    assert torch.allclose(x.grad[:3], (X[:3] - centre) / 6)
    assert torch.allclose(x.grad[3], -(X[3] - centre) * 3 / 6)
    for p in range(3):
        assert torch.dot(step[p], centre - X[p]) > 0, f"positive {p} is not pulled towards its centre"
    assert torch.dot(step[3], X[3] - centre) > 0, "the nearest negative is not pushed away from the centre"
    assert torch.equal(x.grad[4], torch.zeros(2)), "a negative that is not the nearest gets no gradient"


def test_zero_loss_and_gradient_when_the_margin_is_met():
    x = X.clone().requires_grad_(True)
    loss = CoupledClustersLoss(1.0)(x, Y)  # 4 − 16 + 1 < 0 and 1 − 17 + 1 < 0
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(X))


def test_clusters_of_an_index_tuple_are_built_around_each_anchor():
    triplets = (torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([3, 4]))  # anchor 0: P = {0, 1, 2}, N = {3, 4}
    assert CoupledClustersLoss(15.0)(X, Y, triplets).item() == pytest.approx(5 / 6, rel=1e-6)
    pairs = (torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([3]))
    assert CoupledClustersLoss(15.0)(X, Y, pairs).item() == pytest.approx(5 / 6, rel=1e-6)


def test_a_class_alone_is_skipped_and_a_batch_without_clusters_is_an_error():
    lone = torch.cat([X, torch.tensor([[50.0, 50.0]])])
    assert CoupledClustersLoss(15.0)(lone, torch.cat([Y, torch.tensor([2])])).item() == pytest.approx(5 / 12, rel=1e-6)
    with pytest.raises(ValueError, match="no coupled cluster"):
        CoupledClustersLoss(1.0)(X[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="no coupled cluster"):
        CoupledClustersLoss(1.0)(X[:3], torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="margin must be > 0"):
        CoupledClustersLoss(0.0)
    assert coupled_clusters_loss(X, Y.unsqueeze(0) == 0, Y.unsqueeze(0) == 1, 15.0).item() == pytest.approx(5 / 6)


def _override(tmp_path, text: str):
    (tmp_path / "over.yaml").write_text("tune: {search: off}\n" + text)  # params.yaml searches contrastive margins
    return load_params(REPO / "params.yaml", tmp_path / "over.yaml")


PK = "sampler: {name: class_balanced, args: {classes_per_batch: 4, images_per_class: 2, batches_per_epoch: null}}"


def test_params_select_it_from_yaml_with_pk_batches(tmp_path):
    params = _override(tmp_path, f"retrieval:\n  criterion: {{name: coupled_clusters, args: {{margin: 0.5}}}}\n  {PK}\n")
    assert params.retrieval.criterion.spec() == Spec("coupled_clusters", {"margin": 0.5})


@pytest.mark.parametrize("text, message", [
    (f"criterion: {{name: coupled_clusters, args: {{margin: 5}}}}\n  {PK}",
     "retrieval.criterion.coupled_clusters.args.margin: Input should be less than or equal to 4"),
    (f"criterion: {{name: coupled_clusters, args: {{margin: 0}}}}\n  {PK}",
     "retrieval.criterion.coupled_clusters.args.margin: Input should be greater than 0"),
    (f"criterion: {{name: coupled_clusters, args: {{margn: 0.5}}}}\n  {PK}",
     "retrieval.criterion.coupled_clusters.args.margn: unknown key"),
    (f"criterion: {{name: coupled_clusters, args: {{}}}}\n  {PK}",
     "retrieval.criterion.coupled_clusters.args.margin: required key is missing"),
    ("criterion: {name: coupled_clusters, args: {margin: 0.5}}\n  "
     "sampler: {name: random_pairs, args: {pos_per_class: 2, neg_per_class: 2, redraw_every: 1}}\n  miner: null",
     "criterion coupled_clusters mines P×K batches: use sampler class_balanced (or a miner)"),
])
def test_bad_params_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError) as caught:
        _override(tmp_path, f"retrieval:\n  {text}\n")
    assert message in str(caught.value)
