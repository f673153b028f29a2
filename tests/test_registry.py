"""Every registry entry builds from the args params would give it, and params offer exactly the registry's names."""

import typing

import pytest
import torch
from pydantic import TypeAdapter

from components.losses import LOSSES
from components.miners import MINERS
from components.models.backbones import IMAGENET_WEIGHTS
from components.models.pooling import POOLINGS, make_pooling
from components.registry import Registry, Spec
from components.training.batches import SAMPLERS
from pipelines.params import Criterion, Miner, ModelParams, ParamsError, RetrievalParams, Sampler, load_params, with_overrides

EXAMPLE_ARGS = {  # what a params file would set for each entry
    "loss": {
        "double_margin_contrastive": {"pos_margin": 0.5, "neg_margin": 1.2, "squared": True},
        "batch_hard_triplet": {"margin": 0.1},
        "coupled_clusters": {"margin": 0.5},
        "siamese_id_verification": {"ver_weight": 1.0, "id_weight": 0.5},
        "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
        "proxy_anchor": {"margin": 0.1, "alpha": 32.0},
        "arcface": {"margin": 28.6, "scale": 64.0},
    },
    "miner": {
        "multi_similarity": {"epsilon": 0.1},
        "batch_hard": {},
        "triplet_margin": {"margin": 0.2, "type_of_triplets": "semihard"},
        "pair_margin": {"pos_margin": 0.2, "neg_margin": 0.8},
    },
    "sampler": {
        "random_pairs": {"pos_per_class": 2, "neg_per_class": 2, "redraw_every": 1},
        "hard_negative_pairs": {"pos_per_class": 2, "neg_per_class": 2, "redraw_every": 1, "pool_size": 10},
        "mined_positive_pairs": {"pos_per_class": 2, "neg_per_class": 2, "redraw_every": 1, "clusters": 4,
                                 "threshold": 0.8, "max_mined_per_class": 20},
        "ratio_pairs": {"pos_per_class": 2, "start": 1.0, "growth": 1.01, "max_ratio": 4.0},
        "class_balanced": {"classes_per_batch": 2, "images_per_class": 2, "batches_per_epoch": 3},
    },
}
SCHEMAS = {"loss": (LOSSES, Criterion), "miner": (MINERS, Miner), "sampler": (SAMPLERS, Sampler)}


def _validated(kind: str, name: str) -> Spec:
    """The entry's example args through the params schema, as a stage would get them."""
    return TypeAdapter(SCHEMAS[kind][1]).validate_python({"name": name, "args": EXAMPLE_ARGS[kind][name]}).spec()


@pytest.mark.parametrize("kind", SCHEMAS)
def test_params_offer_exactly_the_registry_names(kind):
    registry, union = SCHEMAS[kind]
    members = typing.get_args(typing.get_args(union)[0])
    assert {typing.get_args(m.model_fields["name"].annotation)[0] for m in members} == set(registry.names())
    assert set(EXAMPLE_ARGS[kind]) == set(registry.names())


POOLING_ARGS = {  # what a params file would set for each pooling with args (the others are a bare name)
    "netvlad": {"clusters": 4, "reduction_dim": 6, "alpha": 10.0},
    "gem_second_order": {"reduction_dim": 3, "iterations": 3, "centred": True},
    "mop": {"levels": [1, 2], "region_pooling": "gem"},
    "multi_level": {"stages": [0, 1], "channels": 6, "pooling": "gem"},
}


def test_params_offer_exactly_the_poolings():
    plain, with_args = set(), set()
    for member in typing.get_args(ModelParams.model_fields["pooling"].annotation):  # Annotated[choice, Tag]
        choice = typing.get_args(member)[0]
        if typing.get_origin(choice) is typing.Literal:  # the bare names
            plain |= set(typing.get_args(choice))
        else:  # the {name, args} members
            with_args |= set(typing.get_args(choice.model_fields["name"].annotation))
    assert plain | with_args == set(POOLINGS.names()) and not plain & with_args
    assert set(POOLING_ARGS) == with_args


EMBEDDINGS = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_builds_from_params_and_scores_a_batch(name):
    loss = LOSSES.build(_validated("loss", name), num_classes=3, embedding_size=16)
    embeddings = EMBEDDINGS.clone().requires_grad_(True)
    value = loss(embeddings, LABELS, None)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0 and embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MINERS.names())
def test_every_miner_builds_from_params_and_returns_an_index_tuple(name):
    mined = MINERS.build(_validated("miner", name))(EMBEDDINGS, LABELS)
    assert len(mined) in (3, 4) and all(t.dtype == torch.long and t.max() < len(LABELS) for t in mined if len(t))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_builds_from_params(name):
    assert callable(SAMPLERS.build(_validated("sampler", name)).batches)


@pytest.mark.parametrize("name", POOLINGS.names())
def test_every_pooling_builds_and_pools(name):
    given = {"name": name, "args": POOLING_ARGS[name]} if name in POOLING_ARGS else name
    spec = ModelParams.model_validate({**load_params().model.model_dump(), "pooling": given}).pooling_spec()
    if POOLINGS[name].multi_level:  # given the maps of its stages (blocks of 4 and 6 channels) and the final one
        pool = make_pooling(spec.name, 3.0, spec.args, in_channels=8, stage_layout=((4, 6, 8), (2, 4, 4)))
        maps = [torch.rand(2, 4, 10, 10), torch.rand(2, 6, 5, 5), torch.rand(2, 8, 5, 5)]
    else:
        pool, maps = make_pooling(spec.name, 3.0, spec.args, in_channels=8), torch.rand(2, 8, 5, 5)
    assert pool(maps).shape == (2, pool.output_dim(8))


@pytest.mark.parametrize("arch", IMAGENET_WEIGHTS.names())
def test_every_packaged_weights_entry_gives_its_file(arch):
    assert IMAGENET_WEIGHTS.build(Spec(arch)).is_file()


def test_unknown_names_and_args_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'; expected one of"):
        LOSSES.build(Spec("nope"))
    with pytest.raises(TypeError):
        LOSSES.build(Spec("batch_hard_triplet", {"margn": 0.1}))
    def thing(x: int, y: int = 0) -> tuple[int, int]:
        return x, y

    registry = Registry("thing", {"a": thing})
    assert registry.build(Spec("a", {"x": 1}), y=2, z=3) == (1, 2), "context reaches only the parameters named"


def test_params_select_a_pytorch_metric_learning_loss_by_name_and_args():
    retrieval = load_params("params.yaml").retrieval
    chosen = with_overrides(retrieval, {"criterion": {"name": "multi_similarity", "args": EXAMPLE_ARGS["loss"]["multi_similarity"]},
                                        "sampler": {"name": "class_balanced", "args": EXAMPLE_ARGS["sampler"]["class_balanced"]}})
    assert isinstance(chosen, RetrievalParams) and chosen.criterion.spec() == Spec("multi_similarity", EXAMPLE_ARGS["loss"]["multi_similarity"])
    with pytest.raises(ParamsError, match="criterion.multi_similarity.args.alpha"):
        with_overrides(retrieval, {"criterion": {"name": "multi_similarity", "args": {"beta": 50.0, "base": 0.5}}})
    with pytest.raises(ParamsError, match="pos_margin < neg_margin"):
        with_overrides(retrieval, {"criterion": {"name": "double_margin_contrastive",
                                                 "args": {"pos_margin": 1.3, "neg_margin": 1.2, "squared": True}}})
