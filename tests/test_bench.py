"""The benchmark suite's logic (no timings asserted: speed is measured by `python -m bench`, never tested)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from bench.descriptors import ClusteredDescriptors, Gaussian, neighbour_similarity
from bench.extract import stream_rates
from bench.measure import TreeMemory, goal, interleaved_rates
from bench.pipeline import pipeline_params, stage_order
from bench.report import render, table
from bench.search import _database, _recall, specs
from bench.shards import _exact_neighbours, _reduced, _write_shards, peak_anonymous_memory
from bench.train import timed_loop
from components.training.context import LocalContext
from tests.conftest import REPO


@pytest.fixture
def real():
    """Stand-in for real descriptors: 12 classes of 20 anisotropic, clustered unit vectors in 64-d."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 64)) * np.linspace(2, 0.1, 64)
    x = np.repeat(centres, 20, axis=0) + rng.normal(size=(240, 64)) * np.linspace(1, 0.05, 64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(12), 20)


def test_synthetic_descriptors_are_unit_clustered_and_follow_the_real_sizes(real):
    x, labels = real
    model = ClusteredDescriptors.fit(x, labels, components=16)
    out = np.empty((1000, 64), dtype=np.float32)
    clusters = model.fill(out, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert (np.diff(clusters) >= 0).all() and np.bincount(clusters)[:-1].tolist() == [20] * (clusters[-1])
    same = [out[clusters == c] @ out[clusters == c].T for c in range(3)]
    assert np.mean([s[np.triu_indices(len(s), 1)].mean() for s in same]) > neighbour_similarity(out)["random_pair"]


def test_gaussian_leftover_noise_stays_off_the_principal_directions(real):
    x, _ = real
    g = Gaussian.fit(x, components=8)
    assert g.basis.shape == (64, 8) and g.leftover_std > 0
    draws = g.sample(500, np.random.default_rng(2), centres=np.zeros((500, 64), dtype=np.float32))
    along = draws @ g.basis
    np.testing.assert_allclose(along.std(axis=0), g.scales, rtol=0.2)


def test_search_database_holds_out_the_queries(real):
    x, labels = real
    db, queries, real_in_db = _database(600, x, ClusteredDescriptors.fit(x, labels, 16), 40, np.random.default_rng(3))
    assert db.shape == (600, 64) and queries.shape == (40, 64) and real_in_db == 240 - 20
    assert not any((db == q).all(axis=1).any() for q in queries)
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)


def test_shards_on_disk_and_their_exact_neighbours_match_one_flat_search(real, tmp_path):
    x, labels = real
    reduced = _reduced(x, 16)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1, atol=1e-5)
    model = ClusteredDescriptors.fit(reduced, labels, components=16)
    paths, queries = _write_shards(tmp_path, 1000, 16, 300, 25, model, np.random.default_rng(4))
    db = np.concatenate([np.load(p) for p in paths])
    assert [len(np.load(p)) for p in paths] == [300, 300, 300, 100] and queries.shape == (25, 16)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    expected = np.argsort(-(queries @ db.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(_exact_neighbours(paths, queries), expected)


def test_peak_anonymous_memory_sees_a_transient_allocation():
    with peak_anonymous_memory(interval=0.01) as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.1)
        del block
    assert 48 <= memory["peak_growth_mib"] <= 200


def test_recall_counts_hits_and_ignores_missing_results():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert _recall(found, exact) == pytest.approx((2 + 4) / 8)


@pytest.mark.parametrize("dim", [1280, 1408, 96])
def test_index_specs_fit_the_dimension(dim):
    flat, hnsw, ivfpq = specs(1_000_000, dim)
    assert (flat.kind, hnsw.kind, ivfpq.kind) == ("flat", "hnsw", "ivfpq")
    assert dim % ivfpq.pq_m == 0 and ivfpq.nlist == 1024 and specs(20_000, dim)[2].nlist == 512


def test_stages_run_after_their_inputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    order = stage_order(dict(reversed(list(stages.items()))))
    assert sorted(order) == sorted(stages)
    assert order.index("ingest") < order.index("split") < order.index("classify") < order.index("retrieval")
    assert order.index("retrieval") < order.index("index") < order.index("evaluate")
    with pytest.raises(ValueError, match="cycle"):
        stage_order({"a": {"deps": ["b.txt"], "outs": ["a.txt"]}, "b": {"deps": ["a.txt"], "outs": ["b.txt"]}})


def test_pipeline_params_merge_overrides_and_make_the_full_source_absolute(monkeypatch):
    monkeypatch.chdir(REPO)
    quick = pipeline_params(False, {"classify": {"epochs": 1}})
    assert quick["classify"]["epochs"] == 1 and quick["classify"]["lr"] == yaml.safe_load(open("params.yaml"))["classify"]["lr"]
    full = pipeline_params(True, {})
    assert full["ingest"]["source"].startswith("/") and full["ingest"]["source"].endswith("caltech101")


def test_timed_loop_notes_each_report(tmp_path):
    def three_epochs(job, ctx):
        for epoch in range(job):
            ctx.report({"epoch": epoch}, None)

    times = tmp_path / "times.json"
    timed_loop(3, LocalContext(tmp_path / "run"), loop=three_epochs, times_file=str(times))
    noted = json.loads(times.read_text())
    assert len(noted) == 3 and noted == sorted(noted)


def test_interleaved_rates_and_goals_are_recorded():
    calls = []
    rates = interleaved_rates({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, work=10, rounds=2,
                              min_seconds=0)
    assert calls == ["a", "b"] * 3  # a warm-up round, then 2 timed rounds, in turn
    assert set(rates) == {"a", "b"} and len(rates["a"]["rates"]) == 2 and "loadavg_start" in rates["a"]
    assert goal("g", 0.96, 0.95)["met"] and not goal("g", 16.0, 15.0, unit=" s", higher_is_better=False)["met"]


def test_a_stream_splits_into_its_start_up_and_steady_rate():
    # actors ready after 5 s, then a block of 4 images every 0.1 s: the first block's images count in the start-up
    arrivals = [(5.0 + 0.1 * i, 4) for i in range(11)]
    startup, rate = stream_rates(0.0, arrivals)
    assert startup == 5.0 and rate == pytest.approx(40.0)


def test_report_lists_goals_and_failed_sections():
    results = {
        "mode": "quick", "command": "python -m bench --quick", "git_commit": "abc", "started": "2026-11-23T10:00:00",
        "ended": "2026-11-23T10:09:00", "wall_seconds": 540, "loadavg_start": [1.0, 1, 1], "loadavg_end": [2.0, 1, 1],
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 24, "os": "linux", "python": "3.11", "versions": {"torch": "2"}},
        "sections": {"search": {"error": "ValueError: boom"},
                     "pipeline": {"error": "x", "goals": [goal("pipeline: no-op", 3.0, 15.0, " s", False)]}},
    }
    text = render(results)
    assert "| pipeline: no-op | 3.00 | ≤ 15.0 s | met |" in text and "Failed: `ValueError: boom`" in text
    assert table(["a"], [(None,), (1234.5,)]).splitlines()[2:] == ["| — |", "| 1,234 |"]


def test_accuracy_takes_the_pipeline_sections_run_only_when_it_ran_the_same_params():
    from bench.accuracy import _from_pipeline
    from bench.pipeline import QUICK_OVERRIDES

    stages = [{"stage": s, "returncode": 0, "in_stage_seconds": t, "wall_seconds": w, "loadavg_start": [1, 1, 1],
               "loadavg_end": [2, 2, 2]} for s, t, w in (("ingest", None, 4), ("classify", 46.0, 63), ("retrieval", 55.5, 71),
                                                         ("evaluate", 2.0, 19))]
    pipeline = {"data": "sample (params.yaml)", "overrides": QUICK_OVERRIDES, "stages": stages, "test_map": 0.75,
                "off_the_shelf_map": 0.76, "model": {"backbone": "tf_efficientnet_lite0", "pooling": "gem"}}
    row = _from_pipeline(pipeline, QUICK_OVERRIDES)
    assert (row["backbone"], row["pooling"], row["training_seconds"], row["wall_seconds"]) == ("tf_efficientnet_lite0", "gem", 101.5, 157)
    assert _from_pipeline(pipeline, {}) is None  # other params
    assert _from_pipeline({**pipeline, "data": "full Caltech-101"}, QUICK_OVERRIDES) is None
    failed = [{**s, "returncode": 1} if s["stage"] == "retrieval" else s for s in stages]
    assert _from_pipeline({**pipeline, "stages": failed}, QUICK_OVERRIDES) is None
    assert _from_pipeline(None, QUICK_OVERRIDES) is None


def test_growth_params_are_valid_and_keep_the_budget_per_image(tmp_path):
    from bench.growth import growth_params
    from pipelines.params import load_params

    small, large = growth_params(15, 1500), growth_params(None, 5902)
    for raw in (small, large):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        p = load_params(path)
        assert (p.classify.epochs, p.retrieval.epochs, p.tune.search) == (1, 1, "off")
        assert (p.split.val_classes, p.split.test_classes) == (20, 40)
    assert small["ingest"]["max_images_per_class"] == 15 and large["ingest"]["max_images_per_class"] is None
    batches = [raw["retrieval"]["sampler"]["args"]["batches_per_epoch"] for raw in (small, large)]
    assert batches == [9, 37]  # 40% of the images in batches of 64: the same passes over the train classes


def test_growth_fits_the_exponent_of_each_stage():
    from bench.growth import fits

    def size(images, seconds, mib):
        return {"images": images, "stages": [
            {"stage": "index", "returncode": 0, "wall_seconds": seconds[0], "peak_pss_tree_mib": mib},
            {"stage": "evaluate", "returncode": 0, "wall_seconds": seconds[1], "peak_pss_tree_mib": mib}]}

    sizes = [size(n, (0.01 * n, 1e-5 * n**2), 500.0) for n in (1000, 2000, 4000)]
    assert fits(sizes) == {"index": {"time_exponent": 1.0, "memory_exponent": 0.0},
                           "evaluate": {"time_exponent": 2.0, "memory_exponent": 0.0}}
    failed = size(8000, (80, 640), 500.0)
    failed["stages"][1]["returncode"] = 1
    assert fits([*sizes, failed]) == fits(sizes)  # a size where a stage failed is left out of every fit
    assert fits(sizes[:1]) == {}
    text = render({"mode": "full", "command": "python -m bench", "git_commit": "x", "started": "2026-12-07T00:00",
                   "ended": "2026-12-07T01:00", "wall_seconds": 60, "machine": {"cpu": "c", "cores": 2,
                   "memory_gib": 1, "os": "l", "python": "3.11", "versions": {}},
                   "sections": {"growth": {"data": "cub100", "sizes": [{**s, "cap": c} for s, c in
                                                                       zip(sizes, (10, 20, None))],
                                           "fits": fits(sizes), "goals": []}}})
    assert "| evaluate | 10.0 / 40.0 / 160.0 | 2.00 | 500.0 / 500.0 / 500.0 | 0.000 |" in text
    assert "## Goals" not in text  # a run without goals has no empty goals table


def test_tree_memory_reads_the_peak_reached_between_its_pss_reads():
    """A process that fills 300 MiB just after its first poll and holds it: the PSS read that poll's interval forbade
    is made at the first poll allowed, so a short stage's peak is not its start-up size."""
    fill = "import time; time.sleep(0.3); x = b'1' * (300 * 2**20); time.sleep(1.6)"
    proc = subprocess.Popen([sys.executable, "-c", fill])
    with TreeMemory(proc.pid, interval=0.05, pss_interval=1.0) as memory:
        proc.wait()
    assert memory.peak_pss_bytes > 250 * 2**20
