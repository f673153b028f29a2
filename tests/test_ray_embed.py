"""Embedding on Ray Data with 2 actors on the local Ray: the single-process path's descriptors, every image exactly
once even when an actor is killed mid-run, and an unreadable image reported, not fatal."""

import os
import signal

import numpy as np
import pytest

from components.models.net import RetrievalNet
from components.search.embed import embed_images
from components.search.ray_embed import embed_with_ray
from tests.conftest import random_net, tiny_sample


@pytest.fixture(scope="module")
def net() -> RetrievalNet:
    return random_net()


@pytest.fixture(scope="module")
def uris(tmp_path_factory) -> list[str]:
    return [u for u, _ in tiny_sample(tmp_path_factory.mktemp("images"), classes=4, per_class=6)]


def test_two_actors_give_the_single_process_descriptors(ray_local, net, uris):
    _, expected = embed_images(net, uris, batch_size=4)
    got = embed_with_ray(net, uris, batch_size=4, actors=2)
    np.testing.assert_array_equal(got.indices, np.arange(len(uris)))
    assert got.errors == {} and np.abs(got.descriptors - expected).max() <= 1e-5
    nothing = embed_with_ray(net, [], batch_size=4, actors=2)
    assert nothing.indices.shape == (0,) and nothing.descriptors.shape == (0, net.meta["dim"])


def test_an_unreadable_image_is_reported_and_the_rest_described(ray_local, net, uris, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    mixed = uris[:5] + [str(broken)] + uris[5:9]
    got = embed_with_ray(net, mixed, batch_size=4, actors=2)
    assert list(got.errors) == [5] and "broken.jpg" in got.errors[5]
    np.testing.assert_array_equal(got.indices, [i for i in range(len(mixed)) if i != 5])
    _, expected = embed_images(net, [u for i, u in enumerate(mixed) if i != 5], batch_size=4)
    assert np.abs(got.descriptors - expected).max() <= 1e-5


def test_a_killed_actor_is_restarted_and_no_block_is_lost_or_repeated(ray_local, net, uris):
    from ray.util.state import list_actors

    seen: list[np.ndarray] = []
    killed: list[int] = []

    def on_block(indices: np.ndarray, descriptors: np.ndarray) -> None:
        seen.append(indices)
        if not killed:  # the first block is in: kill one of the actors still working
            pids = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                    if "MapWorker" in a.class_name and a.pid]
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    many = uris * 4  # 96 images in 24 batches: work left for the killed actor's restart
    got = embed_with_ray(net, many, batch_size=4, actors=2, on_block=on_block)
    indices = np.concatenate(seen)
    assert killed and len(indices) == len(many) and sorted(indices.tolist()) == list(range(len(many)))
    assert got.descriptors.shape == (0, net.meta["dim"]) and got.errors == {}


def test_the_index_built_on_ray_leaves_out_and_names_an_unreadable_image(ray_local, net, uris, tmp_path):
    import pandas as pd

    from components.catalog import indexing
    from components.catalog.store import SearchIndex
    from components.search.index import IndexSpec
    from components.search.ray_embed import ray_describer

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    files = uris[:6] + [str(broken)] + uris[6:12]
    images = pd.DataFrame({"id": [f"{i:064x}" for i in range(len(files))], "label": ["c"] * len(files), "uri": files})
    built = indexing.build(str(tmp_path / "index"), net, images, IndexSpec(), batch_size=4,
                           describe=ray_describer(actors=2))
    assert [bad["file"] for bad in built.undescribed] == [str(broken)] and built.undescribed[0]["reason"]
    index = SearchIndex.open(tmp_path / "index")
    assert index.entries["uri"].tolist() == [f for f in files if f != str(broken)]
    _, expected = embed_images(net, index.entries["uri"].tolist(), batch_size=4)
    assert np.abs(index.descriptors - expected).max() <= 1e-5


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_a_stage_embedding_names_the_image_it_could_not_read(ray_local, net, uris, tmp_path, engine):
    """The evaluate stage's embedding (`pipelines.embedding.embed_all`) on either engine: the in-order descriptors,
    and for an image that cannot be read one error naming it, not a traceback or a silently shorter matrix."""
    from components.errors import DataError
    from pipelines.embedding import embed_all
    from pipelines.params import load_params

    params = load_params()
    params = params.model_copy(update={"index": params.index.model_copy(update={"engine": engine, "batch_size": 4})})
    _, expected = embed_images(net, uris[:6], batch_size=4)
    assert np.abs(embed_all(net, uris[:6], params, "test images") - expected).max() <= 1e-5
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"test images: .*broken\.jpg"):
        embed_all(net, uris[:3] + [str(broken)], params, "test images")
