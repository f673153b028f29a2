"""params.yaml is read as DVC reads it (YAML 1.2), every documented spelling parses, and bad values are refused
with a line naming the key: duplicates, booleans for numbers, infinities, unbounded sizes."""

import re
import signal
from pathlib import Path

import pandas as pd
import pytest

from components.data.splits import split_classes
from components.errors import DataError
from pipelines.params import ParamsError, load_params
from tests.conftest import REPO

PARAMS_TEXT = (REPO / "params.yaml").read_text()


def _with(tmp_path: Path, section: str, key: str, value: str, text: str = PARAMS_TEXT) -> Path:
    """params.yaml with `section.key`'s value replaced by the literal YAML `value` (comments kept)."""
    pattern = re.compile(rf"(^{section}:.*\n(?:[ #].*\n)*?\s+{key}: )([^#\n]*?)(\s*(#.*)?)$", re.MULTILINE)
    assert pattern.search(text), f"{section}.{key} not in params.yaml"
    path = tmp_path / "params.yaml"
    path.write_text(pattern.sub(lambda m: m.group(1) + value + m.group(3), text, count=1))
    return path


def test_committed_params_file_loads():
    load_params(REPO / "params.yaml")


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_override_files_apply_to_params_yaml(config):
    base, merged = load_params(REPO / "params.yaml"), load_params(REPO / "params.yaml", config)
    assert merged != base and merged.ingest.source.startswith("../shared/datasets/")
    assert merged.ingest.source.rsplit("/", 1)[1] in config.name  # each names the dataset it runs on


def test_an_override_file_merges_sections_replaces_named_settings_and_extends(tmp_path):
    (tmp_path / "base.yaml").write_text("retrieval:\n  epochs: 7\n  sampler: {name: class_balanced, args: "
                                        "{classes_per_batch: 4, images_per_class: 2, batches_per_epoch: null}}\n")
    (tmp_path / "more.yaml").write_text("extends: base.yaml\nretrieval: {lr: 0.01}\nray: {num_workers: 1}\n")
    merged = load_params(REPO / "params.yaml", tmp_path / "more.yaml")
    base = load_params(REPO / "params.yaml")
    assert (merged.retrieval.epochs, merged.retrieval.lr, merged.ray.num_workers) == (7, 0.01, 1)
    assert merged.retrieval.sampler.spec().args == {"classes_per_batch": 4, "images_per_class": 2, "batches_per_epoch": None}
    assert merged.retrieval.criterion == base.retrieval.criterion and merged.retrieval.momentum == base.retrieval.momentum
    (tmp_path / "bad.yaml").write_text("retrieval: {epochs: 0}\n")
    with pytest.raises(ParamsError, match="params.yaml with .*bad.yaml: retrieval.epochs"):
        load_params(REPO / "params.yaml", tmp_path / "bad.yaml")


def test_every_params_key_is_required(tmp_path):
    """Values come from the params file only: the schema sets no defaults."""
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT.replace("  lr_gamma: 0.1\n", "", 1))
    with pytest.raises(ParamsError, match="classify.lr_gamma: required key is missing"):
        load_params(path)


def test_documented_words_stay_words(tmp_path):
    """YAML 1.1 would read `off`, `yes` and `no` as booleans; DVC and Firesight read them as written."""
    assert load_params(_with(tmp_path, "tune", "search", "off")).tune.search == "off"
    for word in ("yes", "no", "auto"):
        assert load_params(_with(tmp_path, "ray", "use_gpu", word)).ray.use_gpu == word


def test_every_alternative_a_comment_documents_parses(tmp_path):
    """Each `key: value  # a | b | c` line of params.yaml: every listed alternative is accepted as written."""
    base = PARAMS_TEXT.replace("  search: grid ", "  search: off  ")  # margins are searched for contrastive only
    documented = re.findall(r"^(\w+):.*$|^  (\w+): \S+\s+# ([^\n]*\|[^\n]*)$", base, re.MULTILINE)
    checked, section = 0, None
    for top, key, comment in documented:
        if top:
            section = top
            continue
        for alternative in (part.split()[0] for part in comment.split("|")):
            params = load_params(_with(tmp_path, section, key, alternative, base))
            assert getattr(getattr(params, section), key) == alternative
            checked += 1
    assert checked >= 12, f"only {checked} documented alternatives found"


def test_a_duplicate_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT.replace("ray:\n", "ray:\n  num_workers: 1\n", 1))
    line = PARAMS_TEXT.splitlines().index("ray:") + 2
    with pytest.raises(ParamsError, match=rf"params.yaml:\d+: duplicate key 'num_workers' \(first given on line {line}\)"):
        load_params(path)


@pytest.mark.parametrize("section,key,value,message", [
    ("classify", "epochs", "true", "classify.epochs: Input should be a valid integer"),
    ("classify", "epochs", "1.5", "classify.epochs: Input should be a valid integer"),
    ("classify", "lr", ".inf", "classify.lr: Input should be a finite number"),
    ("retrieval", "lr", ".nan", "retrieval.lr: Input should be a finite number"),
    ("model", "image_size", "1000000", "model.image_size: Input should be less than or equal to 4096"),
    ("split", "class_ratio", "{train: .inf, val: 20, test: 40}", "split.class_ratio.train: Input should be a finite"),
    ("ingest", "workers", "'2'", "ingest.workers: Input should be a valid integer"),
    ("classify", "hflip", "1", "classify.hflip: Input should be a valid boolean"),
    ("tune", "search", "false", "tune.search: Input should be 'grid', 'random', 'optuna' or 'off'"),
    ("retrieval", "train_max_side", "[128, 100000]", "train_max_side must be [low, high] with 32 <= low <= high <= 4096"),
    ("evaluate", "cmc_ranks", "[]", "evaluate.cmc_ranks: List should have at least 1 item"),
    ("ingest", "seed", "-1", "ingest.seed: Input should be greater than or equal to 0"),
    ("postprocess", "object_crop", "{thresholds: [0], margin: 0.1}", "postprocess.object_crop.thresholds.0: Input should be greater than 0"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, section, key, value, message):
    with pytest.raises(ParamsError) as caught:
        load_params(_with(tmp_path, section, key, value))
    assert message in str(caught.value)


def test_split_with_an_extreme_ratio_fails_at_once():
    """A ratio whose train share is tiny once made the 'how many classes would do' search spin forever."""
    manifest = pd.DataFrame({"id": [f"{c}-{i}" for c in range(4) for i in range(8)],
                             "label": [f"c{c}" for c in range(4) for _ in range(8)], "uri": "x.jpg"})
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("split_classes did not return within 10 s"))
    signal.alarm(10)
    try:
        with pytest.raises(DataError, match=r"need at least (\d+|more than \d+) eligible classes"):
            split_classes(manifest, seed=0, class_ratio=(1e-6, 1e6, 1e6), val_classes=None, test_classes=None,
                          queries_per_class=2, classifier_train_fraction=0.7, min_images_per_class=6)
    finally:
        signal.alarm(0)
