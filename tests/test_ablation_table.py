import pytest

from components.errors import FiresightError
from pipelines.ablation import ROWS, markdown_table, row_params, selected
from pipelines.params import load_params, with_overrides


def test_rows_cover_the_papers_table_and_each_has_an_earlier_parent():
    assert [r.name for r in ROWS] == ["off-the-shelf", "off-the-shelf + free wins", "retr-s", "retr-d", "cls",
                                      "cls + retr-d", "cls + triplet", "cls + MS", "MS", "cls + MS + free wins",
                                      "MS + free wins",
                                      "MS, NetVLAD", "MS, GeM + second order", "MS, MOP", "MS, multi-level",
                                      "off-the-shelf, object crops", "cls + MS, object crops",
                                      "cls + coupled clusters", "cls + retr-d + mined positives",
                                      "cls + MS, 3 frozen stages", "cls + MS, 2 frozen stages"]
    seen = set()
    for row in ROWS:
        assert row.parent is None if not seen else row.parent in seen  # compared with a row already scored
        seen.add(row.name)
    retrieval = load_params("params.yaml").retrieval
    rows = {r.name: with_overrides(retrieval, r.train) for r in ROWS if r.train is not None}
    assert rows["retr-s"].criterion.args.pos_margin == 0.0  # single vs double margin
    assert rows["retr-d"].criterion.name == "double_margin_contrastive" and rows["retr-d"].init == "imagenet"
    assert rows["retr-d"].criterion.args.pos_margin == 0.7 and rows["retr-d"].miner is None
    assert rows["cls + MS"].criterion == retrieval.criterion and rows["cls + MS"].init == "classifier"
    assert rows["MS"].criterion == retrieval.criterion and rows["MS"].init == "imagenet"
    assert rows["cls + triplet"].criterion.name == "batch_hard_triplet" and rows["cls + triplet"].sampler.name == "class_balanced"


def test_the_issue_16_rows_change_only_their_piece_and_pass_validation():
    params = load_params("params.yaml")
    rows = {r.name: row_params(params, r) for r in ROWS if r.train is not None}  # each validates as whole params
    for name, pooling in (("MS, NetVLAD", "netvlad"), ("MS, GeM + second order", "gem_second_order"),
                          ("MS, MOP", "mop"), ("MS, multi-level", "multi_level")):
        assert rows[name].model.pooling_spec().name == pooling and rows[name].retrieval.init == "imagenet"
        assert rows[name].retrieval.criterion == params.retrieval.criterion  # the MS row's loss, another head
        assert rows[name].retrieval.cache_frozen_trunk  # multi-level fuses blocks 2 (the trunk) and 4: cached too
    assert rows["MS"].model == params.model
    assert rows["cls + coupled clusters"].retrieval.criterion.name == "coupled_clusters"
    assert rows["cls + coupled clusters"].retrieval.sampler == params.retrieval.sampler
    crops = {r.name: r for r in ROWS if r.object_crop}  # untrained: the parent's network, each image cropped
    assert {(r.parent, r.start, r.train) for r in crops.values()} == {("off-the-shelf", "off-the-shelf", None),
                                                                     ("cls + MS", "cls + MS", None)}
    mined = rows["cls + retr-d + mined positives"].retrieval
    assert mined.sampler.name == "mined_positive_pairs" and mined.criterion == rows["cls + retr-d"].retrieval.criterion
    for frozen in (3, 2):  # cls + MS with more of the network trained, its trunk still cached
        row = rows[f"cls + MS, {frozen} frozen stages"]
        assert row.model == params.model.model_copy(update={"frozen_stages": frozen})
        assert row.retrieval == rows["cls + MS"].retrieval and row.retrieval.cache_frozen_trunk


def _summary(value: float) -> dict:
    ci = lambda v: {"value": v, "lo": v - 0.05, "hi": v + 0.05}
    return {"leave_one_out": {"map": ci(value), "map@r": ci(value - 0.2), "recall@1": ci(0.9), "queries": 40},
            "firearm": {"map": ci(value + 0.01), "cmc@1": ci(0.8), "queries": 4, "database": 36}}


def test_markdown_table_shows_cis_and_the_paired_gain_over_the_parent():
    params = load_params("params.yaml")
    rows = [{"row": "off-the-shelf", "parent": None, **_summary(0.5), "gain_over_parent": None, "wall_seconds": 3},
            {"row": "cls + retr-d", "parent": "off-the-shelf", **_summary(0.6),
             "gain_over_parent": {"leave_one_out": {"map": {"diff": 0.1, "lo": 0.07, "hi": 0.13}}},
             "best_epoch": 2, "val_map_start": 0.55, "val_map_last": 0.61, "val_map_best": 0.62, "wall_seconds": 4}]
    table = markdown_table(rows, params)
    assert ("| cls + retr-d | 0.6000 [0.5500, 0.6500] | 0.4000 | 0.900 | 0.6100 [0.5600, 0.6600] | 0.800 | "
            "+0.1000 [+0.0700, +0.1300] vs off-the-shelf | 0.550 → 0.620 (2) | 4 |") in table
    assert "| off-the-shelf | 0.5000 [0.4500, 0.5500] |" in table and "| — | — | 3 |" in table
    assert "leave-one-out over 40 images" in table and "4 queries against 36 database images" in table


def test_a_selection_of_rows_brings_the_rows_they_compare_with_and_start_from():
    assert [r.name for r in selected(["cls + MS + free wins"])] == ["off-the-shelf", "cls", "cls + MS",
                                                                    "cls + MS + free wins"]
    assert [r.name for r in selected(["retr-d", "MS"])] == ["off-the-shelf", "retr-s", "retr-d", "MS"]
    # fine-tuning against every free win: MS's free wins compared with off-the-shelf's, on the same classes
    assert [r.name for r in selected(["MS + free wins"])] == ["off-the-shelf", "off-the-shelf + free wins", "MS",
                                                              "MS + free wins"]
    assert selected(None) == ROWS
    with pytest.raises(FiresightError, match=r"no ablation row 'cls\+MS'"):
        selected(["cls+MS"])
