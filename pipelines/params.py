"""params.yaml schema: every stage's section, validated on load.

A misspelt key or a bad value raises `ParamsError` naming the key (e.g. `classify.lrr: unknown key`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import FiresightError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(FiresightError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestParams(_Section):
    source: str = Field(description="folder or s3:// prefix with one sub-folder per class, or a CSV listing with columns path,label")
    exclude_classes: list[str] = []
    max_images_per_class: int | None = Field(default=None, ge=1)
    min_side: int = Field(default=32, ge=1)
    max_file_bytes: int = Field(default=64 * 2**20, ge=1, description="larger files are quarantined unread")
    max_pixels: int = Field(default=50_000_000, ge=1, description="images with more pixels are quarantined")
    workers: int = Field(default=2, ge=1)
    seed: int = 0


class ClassRatio(_Section):
    train: float = Field(default=107, gt=0)
    val: float = Field(default=20, gt=0)
    test: float = Field(default=40, gt=0)


class SplitParams(_Section):
    seed: int = 0
    class_ratio: ClassRatio = ClassRatio()
    val_classes: int | None = Field(default=None, ge=1)
    test_classes: int | None = Field(default=None, ge=1)
    queries_per_class: int = Field(default=2, ge=1)
    classifier_train_fraction: float = Field(default=0.7, gt=0, lt=1)
    min_images_per_class: int = Field(default=6, ge=2)


class ModelParams(_Section):
    backbone: str = "tf_efficientnet_lite0"
    weights: str = Field(default="imagenet", description="'imagenet' (packaged offline weights) or a weights file path")
    pooling: Literal["mac", "spoc", "gem", "rmac"] = "gem"
    gem_p: float = Field(default=3.0, gt=0)
    frozen_stages: int = Field(default=0, ge=0, description="leading backbone stages kept frozen (stage 0 is the stem)")
    image_size: int = Field(default=224, ge=32, description="longer side of every image at evaluation time")


class _TrainParams(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    lr_step_epochs: int = Field(default=10, ge=1)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    train_max_side: tuple[int, int] = Field(description="random resize range of the longer side while training")
    hflip: bool = True
    rotation_degrees: float = Field(default=0.0, ge=0, le=45, description="random rotation range (±degrees)")
    color_jitter: float = Field(default=0.0, ge=0, le=1, description="brightness/contrast/saturation jitter strength")
    seed: int = 0

    @model_validator(mode="after")
    def _ordered_range(self):
        lo, hi = self.train_max_side
        if not 32 <= lo <= hi:
            raise ValueError(f"train_max_side must be [low, high] with 32 <= low <= high, got {list(self.train_max_side)}")
        return self


class ClassifyParams(_TrainParams):
    head_lr_multiplier: float = Field(default=10.0, gt=0, description="the new linear head's lr = lr × this")


class WhiteningParams(_Section):
    enabled: bool = False
    dim: int | None = Field(default=None, ge=1, description="output dimension (PCA reduction); null keeps all")


class RetrievalParams(_TrainParams):
    init: Literal["classifier", "imagenet"] = Field(default="classifier", description="start from the best classifier or ImageNet")
    loss: Literal["contrastive", "triplet", "siamese"] = "contrastive"
    pos_margin: float = Field(ge=0, description="m+: positive pairs closer than this cost nothing (0 = single margin); "
                                                "used when tune.search is off")
    neg_margin: float = Field(gt=0, description="m-: negative pairs farther than this cost nothing; used when tune.search is off")
    squared_hinge: bool = True
    mining: Literal["random", "hard_negative"] = Field(default="random", description="how pairs are drawn")
    mining_pool_size: int = Field(default=2000, ge=2, description="random pool the hard negatives are mined from")
    pos_pairs_per_class: int = Field(default=180, ge=1)
    neg_pairs_per_class: int = Field(default=180, ge=1)
    redraw_every: int = Field(default=5, ge=1, description="epochs between two draws of the pairs")
    triplet_margin: float = Field(default=0.1, gt=0)
    classes_per_batch: int = Field(default=8, ge=2, description="P of the P×K triplet batches")
    images_per_class: int = Field(default=4, ge=2, description="K of the P×K triplet batches")
    whitening: WhiteningParams = WhiteningParams()

    @model_validator(mode="after")
    def _margins_ordered(self):
        if self.pos_margin >= self.neg_margin:
            raise ValueError(f"pos_margin ({self.pos_margin}) must be below neg_margin ({self.neg_margin})")
        return self


MIN_MARGIN_GAP = 0.05  # a random/optuna search draws m− at least this far above m+


class AshaParams(_Section):
    enabled: bool = True
    grace_period: int = Field(default=1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(default=2.0, gt=1, description="1/reduction_factor of the trials go on at each rung")


class TuneParams(_Section):
    search: Literal["grid", "random", "optuna", "off"] = Field(
        default="grid", description="off: retrieval uses retrieval.pos_margin/neg_margin as given")
    pos_margins: list[float] = Field(default=[0.5, 0.7], min_length=1, description="grid values of m+")
    neg_margins: list[float] = Field(default=[1.0, 1.2], min_length=1, description="grid values of m−")
    pos_range: tuple[float, float] = Field(default=(0.0, 1.0), description="random/optuna range of m+")
    neg_range: tuple[float, float] = Field(default=(0.6, 1.6), description="random/optuna range of m−")
    num_trials: int = Field(default=8, ge=1, description="random/optuna budget (a grid runs all its m+ < m− pairs)")
    epochs_per_trial: int = Field(default=2, ge=1)
    workers_per_trial: int = Field(default=1, ge=1, description="Ray Train workers of one trial")
    max_concurrent_trials: int = Field(default=2, ge=1)
    driver_cpus: float = Field(default=0.25, gt=0, le=1, description="CPU held by each trial's driver function")
    asha: AshaParams = AshaParams()
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        for name in ("pos_margins", "neg_margins", "pos_range", "neg_range"):
            values = list(getattr(self, name))
            if not all(0 <= v <= 2 for v in values):
                raise ValueError(f"{name} must lie in [0, 2] (distances of unit descriptors), got {values}")
        for name in ("pos_range", "neg_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be [low, high], got {[lo, hi]}")
        if self.search == "grid" and not any(p < n for p in self.pos_margins for n in self.neg_margins):
            raise ValueError(f"no grid pair has m+ < m−: pos_margins {self.pos_margins}, neg_margins {self.neg_margins}")
        if self.search in ("random", "optuna") and self.pos_range[0] + MIN_MARGIN_GAP > self.neg_range[1]:
            raise ValueError(f"pos_range {list(self.pos_range)} and neg_range {list(self.neg_range)} leave no m+ < m−")
        if self.asha.enabled and self.asha.grace_period > self.epochs_per_trial:
            raise ValueError(f"asha.grace_period ({self.asha.grace_period}) exceeds epochs_per_trial ({self.epochs_per_trial})")
        return self


class RayParams(_Section):
    address: str | None = Field(default=None, description="a Ray cluster to join (RAY_ADDRESS overrides); "
                                                             "null starts a private local Ray")
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    storage_path: str = ".ray_results"


class IndexParams(_Section):
    batch_size: int = Field(default=32, ge=1)
    kind: Literal["flat", "hnsw", "ivfpq"] = Field(default="flat", description="exact, or approximate search")
    hnsw_m: int = Field(default=32, ge=2, description="hnsw: links per node")
    ef_construction: int = Field(default=40, ge=1, description="hnsw: candidates while building")
    ef_search: int = Field(default=64, ge=1, description="hnsw: candidates while searching")
    nlist: int = Field(default=1024, ge=1, description="ivfpq: k-means cells")
    pq_m: int = Field(default=32, ge=1, description="ivfpq: bytes per code (must divide the descriptor dimension)")
    nprobe: int = Field(default=16, ge=1, description="ivfpq: cells searched per query")
    dba_k: int = Field(default=0, ge=0, description="database-side augmentation neighbours; 0 = off")
    dba_alpha: float = Field(default=3.0, ge=0)


class EvaluateParams(_Section):
    cmc_ranks: list[int] = [1, 5, 10]
    qe_k: int = Field(default=0, ge=0, description="αQE neighbours; 0 = off")
    qe_alpha: float = Field(default=3.0, ge=0, description="αQE weight exponent; 0 = plain average QE")
    registered_model: str = "firesight-retriever"
    champion_alias: str = "champion"


class TrackingParams(_Section):
    uri: str = Field(default="sqlite:///mlflow.db", description="overridden by MLFLOW_TRACKING_URI when set")
    experiment: str = "firesight"


class Params(_Section):
    ingest: IngestParams
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    classify: ClassifyParams
    tune: TuneParams = TuneParams()
    retrieval: RetrievalParams
    ray: RayParams = RayParams()
    index: IndexParams = IndexParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()


    @model_validator(mode="after")
    def _margins_matter(self):
        if self.tune.search != "off" and self.retrieval.loss != "contrastive":
            raise ValueError(f"tune.search: {self.tune.search} searches contrastive margins, but retrieval.loss is "
                             f"{self.retrieval.loss}; set tune.search: off")
        return self


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"
