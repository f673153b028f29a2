"""params.yaml schema: every stage's section, validated on load.

Every value is set in the params file: the schema validates, it sets no defaults. The file is read as YAML 1.2, as
DVC reads it: only `true`/`false` are booleans (`search: off` and `use_gpu: no`
stay the words they are), and a key given twice is an error. Values are checked strictly (no `true` for a number,
no `1.5` for a count, no `.inf`/`.nan`) and every number has finite bounds. A misspelt key or a bad value raises
`ParamsError` naming the key (e.g. `classify.lrr: unknown key`).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError

from components.errors import FiresightError
from components.registry import Spec
from components.search_space import Dimension, SearchSpace

DEFAULT_PARAMS = Path("params.yaml")
MAX_SIDE = 4096  # pixels: the longest image side any stage resizes to
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class ParamsError(FiresightError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class IngestParams(_Section):
    source: str = Field(description="folder or s3:// prefix with one sub-folder per class, or a CSV listing with columns path,label")
    exclude_classes: list[str]
    max_images_per_class: int | None = Field(ge=1, le=10**7)
    min_side: int = Field(ge=1, le=MAX_SIDE)
    max_file_bytes: int = Field(ge=1, le=2**34, description="larger files are quarantined unread")
    max_pixels: int = Field(ge=1, le=10**9, description="images with more pixels are quarantined")
    workers: int = Field(ge=1, le=256)
    seed: Seed


class ClassRatio(_Section):
    train: float = Field(gt=0, le=10**6)
    val: float = Field(gt=0, le=10**6)
    test: float = Field(gt=0, le=10**6)


class SplitParams(_Section):
    seed: Seed
    class_ratio: ClassRatio
    val_classes: int | None = Field(ge=1, le=10**6)
    test_classes: int | None = Field(ge=1, le=10**6)
    queries_per_class: int = Field(ge=1, le=10**4)
    classifier_train_fraction: float = Field(gt=0, lt=1)
    min_images_per_class: int = Field(ge=2, le=10**4)


class ModelParams(_Section):
    backbone: str
    weights: str = Field(description="'imagenet' (packaged offline weights) or a weights file path")
    pooling: Pooling = Field(description="components.models.pooling.POOLINGS: a plain name, or {name, args}")
    gem_p: float = Field(gt=0, le=100, description="initial GeM exponent (gem, and GeM inside gem_second_order/mop/multi_level)")
    frozen_stages: int = Field(ge=0, le=16, description="leading backbone stages kept frozen (stage 0 is the stem)")
    image_size: int = Field(ge=32, le=MAX_SIDE, description="longer side of every image at evaluation time")
    draft_decode: bool = Field(description="decode a JPEG at 1/2, 1/4 or 1/8 scale when it is larger than twice the "
                               "side it is described at (index, evaluation, queries): several times cheaper")

    def pooling_spec(self) -> Spec:
        """model.pooling as a registry spec: a plain name has no args (GeM's exponent is gem_p)."""
        return Spec(self.pooling) if isinstance(self.pooling, str) else self.pooling.spec()


class _TrainParams(_Section):
    epochs: int = Field(ge=1, le=10**4)
    batch_size: int = Field(ge=1, le=4096)
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0, le=1)
    lr_step_epochs: int = Field(ge=1, le=10**4)
    lr_gamma: float = Field(gt=0, le=1)
    train_max_side: tuple[int, int] = Field(description="random resize range of the longer side while training")
    hflip: bool
    rotation_degrees: float = Field(ge=0, le=45, description="random rotation range (±degrees)")
    color_jitter: float = Field(ge=0, le=1, description="brightness/contrast/saturation jitter strength")
    seed: Seed

    @model_validator(mode="after")
    def _ordered_range(self):
        lo, hi = self.train_max_side
        if not 32 <= lo <= hi <= MAX_SIDE:
            raise ValueError(f"train_max_side must be [low, high] with 32 <= low <= high <= {MAX_SIDE}, got {list(self.train_max_side)}")
        return self


class ClassifyParams(_TrainParams):
    head_lr_multiplier: float = Field(gt=0, le=1000, description="the new linear head's lr = lr × this")


class _Named(_Section):
    """A registry entry chosen by params: `{name: ..., args: {...}}` (components/registry.py)."""

    def spec(self) -> Spec:
        return Spec(self.name, self.args.model_dump())


PlainPooling = Literal["mac", "spoc", "gem", "rmac"]  # no args (GeM's p is model.gem_p)


class NetVLADArgs(_Section):
    clusters: int = Field(ge=1, le=1024, description="K centres (k-means-initialised on train features)")
    reduction_dim: int | None = Field(ge=1, le=4096, description="1×1 conv reduction D before VLAD (null: none); "
                                                                 "the descriptor is K·D")
    alpha: float = Field(gt=0, le=10**6, description="assignment sharpness α (softmax of −α‖x − c_k‖²)")


class NetVLADPooling(_Named):
    name: Literal["netvlad"]
    args: NetVLADArgs


class SecondOrderArgs(_Section):
    reduction_dim: int = Field(ge=1, le=256, description="r: channels of the covariance; it adds r(r+1)/2 dims")
    iterations: int = Field(ge=1, le=30, description="Newton–Schulz steps of the matrix square root")
    centred: bool = Field(description="covariance (true, iSQRT-COV) or the uncentred second moment (bilinear)")


class GeMSecondOrderPooling(_Named):
    name: Literal["gem_second_order"]
    args: SecondOrderArgs


class MOPArgs(_Section):
    levels: list[Annotated[int, Field(ge=1, le=16)]] = Field(min_length=1, max_length=8,
                                                             description="grid sizes g (g×g cells), increasing")
    region_pooling: Literal["gem", "mac"] = Field(description="how each cell is pooled")

    @model_validator(mode="after")
    def _levels_increase(self):
        if any(a >= b for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError(f"levels must be strictly increasing, got {self.levels}")
        return self


class MOPPooling(_Named):
    name: Literal["mop"]
    args: MOPArgs


class MultiLevelArgs(_Section):
    stages: list[Annotated[int, Field(ge=0, le=6)]] = Field(
        min_length=1, max_length=7, description="indices of the timm EfficientNet `blocks` (0-6) whose outputs are "
        "fused with the final feature map, strictly increasing (lite0 blocks: 16, 24, 40, 80, 112, 192, 320 channels "
        "at strides 2, 4, 8, 16, 16, 32, 32; the final map 1280 at 32)")
    channels: int = Field(ge=1, le=4096, description="each level's 1×1 conv output: the descriptor size")
    pooling: Literal["gem", "spoc"] = Field(description="how the fused map is pooled (gem: p is model.gem_p)")

    @model_validator(mode="after")
    def _stages_increase(self):
        if any(a >= b for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"stages must be strictly increasing, got {self.stages}")
        return self


class MultiLevelPooling(_Named):
    name: Literal["multi_level"]
    args: MultiLevelArgs


_POOLINGS_WITH_ARGS = ("netvlad", "gem_second_order", "mop", "multi_level")


def _pooling_form(value: Any) -> str | None:
    """The union member a model.pooling value is for: a plain name, or the name of a `{name, args}` one."""
    if isinstance(value, str):
        return "plain" if value in typing.get_args(PlainPooling) else None
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return name if name in _POOLINGS_WITH_ARGS else None


Pooling = Annotated[Annotated[PlainPooling, Tag("plain")] | Annotated[NetVLADPooling, Tag("netvlad")]
                    | Annotated[GeMSecondOrderPooling, Tag("gem_second_order")] | Annotated[MOPPooling, Tag("mop")]
                    | Annotated[MultiLevelPooling, Tag("multi_level")],
                    Discriminator(_pooling_form, custom_error_type="pooling", custom_error_message=(
                        f"expected {' | '.join(typing.get_args(PlainPooling))}, or {{name, args}} with name "
                        f"{' | '.join(_POOLINGS_WITH_ARGS)}"))]
ModelParams.model_rebuild()  # its pooling field is the union above


class DoubleMarginArgs(_Section):
    pos_margin: float = Field(ge=0, le=2, description="m+: positive pairs closer than this cost nothing (0 = single "
                                                      "margin); used when tune.search is off")
    neg_margin: float = Field(gt=0, le=2, description="m-: negative pairs farther than this cost nothing; used when "
                                                      "tune.search is off")
    squared: bool = Field(description="squared hinges (DeepFirearm) or plain ones")

    @model_validator(mode="after")
    def _margins_ordered(self):  # the loss's own rule, checked on load (this module imports no model code)
        if not self.pos_margin < self.neg_margin:
            raise ValueError(f"need 0 <= pos_margin < neg_margin, got {self.pos_margin}, {self.neg_margin}")
        return self


class DoubleMarginCriterion(_Named):
    name: Literal["double_margin_contrastive"]
    args: DoubleMarginArgs


class MarginArgs(_Section):
    margin: float = Field(gt=0, le=2)


class BatchHardTripletCriterion(_Named):
    name: Literal["batch_hard_triplet"]
    args: MarginArgs


class CoupledClustersArgs(_Section):
    margin: float = Field(gt=0, le=4, description="α, on squared distances (≤ 4 between unit descriptors)")


class CoupledClustersCriterion(_Named):
    name: Literal["coupled_clusters"]
    args: CoupledClustersArgs


class SiameseArgs(_Section):
    ver_weight: float = Field(ge=0, le=100, description="weight of the same/different verification loss")
    id_weight: float = Field(ge=0, le=100, description="weight of the identification loss of each image")


class SiameseCriterion(_Named):
    name: Literal["siamese_id_verification"]
    args: SiameseArgs


class MultiSimilarityArgs(_Section):
    alpha: float = Field(gt=0, le=1000, description="weight of positive pairs")
    beta: float = Field(gt=0, le=1000, description="weight of negative pairs")
    base: float = Field(ge=-1, le=1, description="similarity offset λ")


class MultiSimilarityCriterion(_Named):
    name: Literal["multi_similarity"]
    args: MultiSimilarityArgs


class ProxyAnchorArgs(_Section):
    margin: float = Field(ge=0, le=2)
    alpha: float = Field(gt=0, le=1000, description="scale")


class ProxyAnchorCriterion(_Named):
    name: Literal["proxy_anchor"]
    args: ProxyAnchorArgs


class ArcFaceArgs(_Section):
    margin: float = Field(ge=0, le=90, description="angular margin in degrees")
    scale: float = Field(gt=0, le=1000)


class ArcFaceCriterion(_Named):
    name: Literal["arcface"]
    args: ArcFaceArgs


Criterion = Annotated[DoubleMarginCriterion | BatchHardTripletCriterion | CoupledClustersCriterion | SiameseCriterion
                      | MultiSimilarityCriterion | ProxyAnchorCriterion | ArcFaceCriterion, Field(discriminator="name")]


class PairCountArgs(_Section):
    pos_per_class: int = Field(ge=1, le=10**5, description="positive pairs drawn per class (paper: 180)")
    neg_per_class: int = Field(ge=1, le=10**5, description="negative pairs drawn per class (paper: 180)")
    redraw_every: int = Field(ge=1, le=10**4, description="epochs between two draws of the pairs")


class RandomPairsSampler(_Named):
    name: Literal["random_pairs"]
    args: PairCountArgs


class HardNegativeArgs(PairCountArgs):
    pool_size: int = Field(ge=2, le=10**7, description="random pool the hard negatives are mined from")


class HardNegativePairsSampler(_Named):
    name: Literal["hard_negative_pairs"]
    args: HardNegativeArgs


class MinedPositivesArgs(PairCountArgs):
    clusters: int = Field(ge=1, le=10**6, description="k of the k-means over the train images' descriptors")
    threshold: float = Field(ge=-1, le=1, description="cosine similarity a same-class, same-cluster pair needs to be mined")
    max_mined_per_class: int = Field(ge=1, le=10**6, description="mined positive pairs kept per class and draw")


class MinedPositivePairsSampler(_Named):
    name: Literal["mined_positive_pairs"]
    args: MinedPositivesArgs


class RatioPairsArgs(_Section):
    pos_per_class: int = Field(ge=1, le=10**5)
    start: float = Field(gt=0, le=100, description="negatives per positive in epoch 1")
    growth: float = Field(ge=1, le=10, description="× per epoch")
    max_ratio: float = Field(gt=0, le=100)


class RatioPairsSampler(_Named):
    name: Literal["ratio_pairs"]
    args: RatioPairsArgs


class ClassBalancedArgs(_Section):
    classes_per_batch: int = Field(ge=2, le=10**4, description="P of the P×K batches")
    images_per_class: int = Field(ge=2, le=10**4, description="K of the P×K batches")
    batches_per_epoch: int | None = Field(ge=1, le=10**7, description="batches of an epoch (all workers together); "
                                          "null: one per P classes, each class about once")


class ClassBalancedSampler(_Named):
    name: Literal["class_balanced"]
    args: ClassBalancedArgs


Sampler = Annotated[RandomPairsSampler | HardNegativePairsSampler | MinedPositivePairsSampler | RatioPairsSampler
                    | ClassBalancedSampler, Field(discriminator="name")]


class NoArgs(_Section):
    pass


class MultiSimilarityMinerArgs(_Section):
    epsilon: float = Field(ge=0, le=2)


class MultiSimilarityMiner(_Named):
    name: Literal["multi_similarity"]
    args: MultiSimilarityMinerArgs


class BatchHardMiner(_Named):
    name: Literal["batch_hard"]
    args: NoArgs


class TripletMarginMinerArgs(_Section):
    margin: float = Field(ge=0, le=2)
    type_of_triplets: Literal["all", "hard", "semihard", "easy"]


class TripletMarginMiner(_Named):
    name: Literal["triplet_margin"]
    args: TripletMarginMinerArgs


class PairMarginMinerArgs(_Section):
    pos_margin: float = Field(ge=0, le=2)
    neg_margin: float = Field(ge=0, le=2)


class PairMarginMiner(_Named):
    name: Literal["pair_margin"]
    args: PairMarginMinerArgs


Miner = Annotated[MultiSimilarityMiner | BatchHardMiner | TripletMarginMiner | PairMarginMiner,
                  Field(discriminator="name")]


class RetrievalParams(_TrainParams):
    init: Literal["classifier", "imagenet"] = Field(description="start from the best classifier or ImageNet")
    criterion: Criterion = Field(description="the loss, from components.losses.LOSSES")
    sampler: Sampler = Field(description="how batches are drawn, from components.training.batches.SAMPLERS")
    miner: Miner | None = Field(description="in-batch mining, from components.miners.MINERS; null: "
                                                            "the sampler's pairs (or the whole batch)")
    cache_frozen_trunk: bool = Field(description="compute the frozen stages' outputs once per image (and mirror): "
                                     "train_max_side [S, S], flips the only augmentation")

    @model_validator(mode="after")
    def _triplets_formable(self):
        if (self.criterion.name in ("batch_hard_triplet", "coupled_clusters") and self.sampler.name != "class_balanced"
                and self.miner is None):
            raise ValueError(f"criterion {self.criterion.name} mines P×K batches: use sampler class_balanced (or a miner)")
        return self

    @model_validator(mode="after")
    def _cacheable(self):
        if self.cache_frozen_trunk and (self.train_max_side[0] != self.train_max_side[1] or self.rotation_degrees
                                        or self.color_jitter):
            raise ValueError("cache_frozen_trunk trains at one size with flips only: train_max_side must be [S, S] "
                             "and rotation_degrees, color_jitter 0")
        return self


class AshaParams(_Section):
    enabled: bool
    grace_period: int = Field(ge=1, le=10**4, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(gt=1, le=100, description="1/reduction_factor of the trials go on at each rung")


class AboveParams(_Section):
    path: str = Field(description="another searched path this one must exceed")
    gap: float = Field(ge=0, le=10**6, description="by at least this much")


class DimensionParams(_Section):
    values: list[float | int | str | bool] = Field(min_length=1, description="grid values")
    range: tuple[float, float] | None = Field(description="random/optuna range [low, high]; null: grid only")
    log: bool = Field(description="draw on a log scale")
    integer: bool = Field(description="draw whole numbers")
    above: AboveParams | None = Field(description="keep this path above another (m− above m+)")

    @model_validator(mode="after")
    def _range_ordered(self):
        if self.range is not None and not self.range[0] <= self.range[1]:
            raise ValueError(f"range must be [low, high], got {list(self.range)}")
        if self.log and self.range is not None and self.range[0] <= 0:
            raise ValueError(f"a log-scale range must be positive, got {list(self.range)}")
        return self


SEARCHABLE = "retrieval."  # a trial rebuilds the retrieval job: the paths it can vary


class TuneParams(_Section):
    search: Literal["grid", "random", "optuna", "off"] = Field(
        description="off: retrieval trains on its params as given")
    space: dict[str, DimensionParams] = Field(min_length=1, description="the searched params paths (retrieval.*)")
    num_trials: int = Field(ge=1, le=10**4, description="random/optuna budget (a grid runs all its points)")
    epochs_per_trial: int = Field(ge=1, le=10**4)
    workers_per_trial: int = Field(ge=1, le=1024, description="Ray Train workers of one trial")
    max_concurrent_trials: int = Field(ge=1, le=1024)
    driver_cpus: float = Field(gt=0, le=1, description="CPU held by each trial's driver function")
    asha: AshaParams
    seed: Seed

    @model_validator(mode="after")
    def _consistent(self):
        for path, dim in self.space.items():
            if not path.startswith(SEARCHABLE):
                raise ValueError(f"space: {path}: only {SEARCHABLE}* paths can be searched")
            if dim.above is not None and dim.above.path not in self.space:
                raise ValueError(f"space: {path} is above {dim.above.path}, which is not searched")
            if self.search in ("random", "optuna") and dim.range is None:
                raise ValueError(f"space: {path}: a {self.search} search needs its range")
        if self.asha.enabled and self.asha.grace_period > self.epochs_per_trial:
            raise ValueError(f"asha.grace_period ({self.asha.grace_period}) exceeds epochs_per_trial ({self.epochs_per_trial})")
        return self


def unflatten(point: dict[str, Any]) -> dict[str, Any]:
    """{"retrieval.lr": 0.1, ...} as nested overrides {"retrieval": {"lr": 0.1}, ...}."""
    nested: dict[str, Any] = {}
    for path, value in point.items():
        *parents, leaf = path.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


class RayParams(_Section):
    address: str | None = Field(description="a Ray cluster to join (RAY_ADDRESS overrides); "
                                                             "null starts a private local Ray")
    num_workers: int = Field(ge=1, le=1024)
    cpus_per_worker: int = Field(ge=1, le=1024)
    use_gpu: Literal["auto", "yes", "no"]
    storage_path: str


class IndexParams(_Section):
    batch_size: int = Field(ge=1, le=4096)
    engine: Literal["local", "ray"] = Field(description="embed in the stage's process, or on Ray Data actors")
    actors: int = Field(ge=1, le=1024, description="ray: actors, each holding the model once")
    kind: Literal["auto", "flat", "hnsw", "ivfflat", "ivfpq"] = Field(
        description="exact, approximate search, or auto: by the database's size")
    hnsw_m: int = Field(ge=2, le=1024, description="hnsw: links per node")
    ef_construction: int = Field(ge=1, le=10**5, description="hnsw: candidates while building")
    ef_search: int = Field(ge=1, le=10**5, description="hnsw: candidates while searching")
    nlist: int = Field(ge=1, le=10**7, description="ivfflat/ivfpq: k-means cells")
    pq_m: int = Field(ge=1, le=1024, description="ivfpq: bytes per code (must divide the descriptor dimension)")
    nprobe: int = Field(ge=1, le=10**7, description="ivfflat/ivfpq: cells searched per query")
    train_sample: int = Field(ge=1, le=10**8, description="ivfflat/ivfpq: rows the quantisers are trained on")
    refine: int = Field(ge=0, le=10**5, description="ivfpq: candidates per query re-scored exactly (0: off)")


Neighbours = Annotated[int, Field(ge=0, le=10**4)]
Alpha = Annotated[float, Field(ge=0, le=100)]


class WhiteningCandidates(_Section):
    kinds: list[Literal["center", "pca", "learned"]] = Field(description="tried besides none")
    dims: list[Annotated[int, Field(ge=1, le=2**16)] | None] = Field(min_length=1, description="pca/learned: kept dimensions (null: all)")
    shrinkages: list[Annotated[float, Field(ge=0, le=1)]] = Field(min_length=1, description="pca/learned: eigenvalue shrinkage")


class AugmentationCandidates(_Section):
    k: list[Neighbours] = Field(min_length=1, description="neighbours (0 = off)")
    alpha: list[Alpha] = Field(min_length=1, description="weight exponents")


class KReciprocalCandidates(_Section):
    k1: list[Annotated[int, Field(ge=1, le=10**4)]] = Field(description="empty: k-reciprocal re-ranking is not tried")
    k2: list[Annotated[int, Field(ge=1, le=10**4)]] = Field(min_length=1)
    lambda_value: list[Annotated[float, Field(ge=0, le=1)]] = Field(min_length=1)


class ObjectCropCandidates(_Section):
    thresholds: list[Annotated[float, Field(gt=0, le=1)]] = Field(description="activation fractions of the peak that "
                                                                  "bound the object (empty: crops are not tried)")
    margin: float = Field(ge=0, le=1, description="the box grows by this fraction of its size on each side")


class PostprocessParams(_Section):
    image_sizes: list[Annotated[int, Field(ge=32, le=MAX_SIDE)]] = Field(description="tried besides model.image_size")
    scale_sets: list[list[Annotated[float, Field(gt=0, le=4)]]] = Field(min_length=1, description="multi-scale descriptor sets")
    object_crop: ObjectCropCandidates
    whitening: WhiteningCandidates
    dba: AugmentationCandidates
    qe: AugmentationCandidates
    k_reciprocal: KReciprocalCandidates

    @model_validator(mode="after")
    def _scale_sets_nonempty(self):
        if any(not scales for scales in self.scale_sets):
            raise ValueError("scale_sets: every set needs at least one scale")
        return self


class BootstrapParams(_Section):
    resamples: int = Field(ge=100, le=10**6, description="class resamples per confidence interval")
    confidence: float = Field(gt=0.5, lt=1)
    seed: Seed


class EvaluateParams(_Section):
    cmc_ranks: list[Annotated[int, Field(ge=1, le=10**7)]] = Field(min_length=1)
    recall_ks: list[Annotated[int, Field(ge=1, le=10**7)]] = Field(min_length=1, description="Recall@K of the leave-one-out protocol")
    bootstrap: BootstrapParams
    registered_model: str
    champion_alias: str


class TrackingParams(_Section):
    uri: str = Field(description="overridden by MLFLOW_TRACKING_URI when set")
    experiment: str


class Params(_Section):
    ingest: IngestParams
    split: SplitParams
    model: ModelParams
    classify: ClassifyParams
    tune: TuneParams
    retrieval: RetrievalParams
    ray: RayParams
    postprocess: PostprocessParams
    index: IndexParams
    evaluate: EvaluateParams
    tracking: TrackingParams


    @model_validator(mode="after")
    def _trunk_frozen(self):
        if self.retrieval.cache_frozen_trunk:
            if self.model.frozen_stages < 1:
                raise ValueError("retrieval.cache_frozen_trunk needs a frozen trunk: model.frozen_stages >= 1 "
                                 "(or set retrieval.cache_frozen_trunk: false)")
            last_frozen_block = self.model.frozen_stages - 2  # stage 0 is the stem, stage k block k - 1
            if isinstance(self.model.pooling, MultiLevelPooling) and self.model.pooling.args.stages[0] < last_frozen_block:
                raise ValueError(f"retrieval.cache_frozen_trunk: the multi-level pooling fuses block "
                                 f"{self.model.pooling.args.stages[0]}, inside the frozen trunk (blocks 0-"
                                 f"{last_frozen_block}): fuse blocks >= {last_frozen_block}, freeze fewer stages, or "
                                 "set retrieval.cache_frozen_trunk: false")
        return self

    @model_validator(mode="after")
    def _margins_matter(self):
        if self.tune.search == "off":
            return self
        space = search_space(self.tune)
        try:
            space.check(self.tune.search)
        except ValueError as e:
            raise ValueError(f"tune.space: {e}") from None
        for point in space.grid_points() if self.tune.search == "grid" else space.range_corners():
            try:  # every trial's values must make valid retrieval params
                with_overrides(self.retrieval, unflatten(point)["retrieval"])
            except ParamsError as e:
                raise ValueError(f"tune.space: the point {point} does not fit retrieval: {e}") from None
        return self


def search_space(t: TuneParams) -> SearchSpace:
    """The tune section's space as components see it."""
    return SearchSpace(tuple(
        Dimension(path, tuple(d.values), *(d.range or (None, None)), d.log, d.integer,
                  d.above.path if d.above else None, d.above.gap if d.above else 0.0)
        for path, d in t.space.items()))


def replaces_whole(change: Any) -> bool:
    """Whether an override value replaces what it overrides whole: a `{name, args}` setting, or a search space
    (a mapping keyed by params paths)."""
    return isinstance(change, dict) and ("name" in change or any("." in str(key) for key in change))


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: a mapping merges into the value it overrides, unless it `replaces_whole`;
    any other value replaces."""

    def merged(value: Any, change: Any) -> Any:
        if isinstance(value, dict) and isinstance(change, dict) and not replaces_whole(change):
            return {**value, **{k: merged(value.get(k), v) for k, v in change.items()}}
        return change

    return merged(base, overrides)


def with_overrides(section: _Section, overrides: dict[str, Any]) -> _Section:
    """`section` (or the whole `Params`) with `overrides` merged in (`merge_overrides`) and validated again."""
    try:
        return type(section).model_validate_json(json.dumps(merge_overrides(section.model_dump(mode="json"), overrides)))
    except ValidationError as e:
        raise ParamsError("overrides " + json.dumps(overrides) + ": " + "; ".join(_describe(err) for err in e.errors())) from None


def read_overrides(path: Path | str) -> dict[str, Any]:
    """An override file (configs/*.yaml): only the params keys that differ from params.yaml; `extends: FILE` (a path
    beside it) applies that override file first."""
    path = Path(path)
    try:
        overrides = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such override file") from None
    except (OSError, UnicodeDecodeError, YAMLError) as e:
        raise ParamsError(f"{path}: cannot read: {e}") from None
    if not isinstance(overrides, dict):
        raise ParamsError(f"{path}: expected a mapping of params sections, got {type(overrides).__name__}")
    if "extends" in overrides:
        overrides = dict(overrides)
        return merge_overrides(read_overrides(path.parent / str(overrides.pop("extends"))), overrides)
    return overrides


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: Path | str | None = None) -> Params:
    """The params file, validated; with `overrides`, an override file's keys merged in first (`merge_overrides`)."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: cannot read: {e}") from None
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}:{e.problem_mark.line + 1}: duplicate key {_duplicate_key(e)!r} "
                          f"(first given on line {e.context_mark.line + 1}); give each key once") from None
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    source = str(path)
    if overrides is not None:
        raw, source = merge_overrides(raw, read_overrides(overrides)), f"{path} with {overrides}"
    try:  # JSON mode: strict types that still take YAML's lists for tuples; .inf/.nan reach the finite check
        return Params.model_validate_json(json.dumps(raw, default=str))
    except ValidationError as e:
        raise ParamsError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def read_yaml(text: str) -> Any:
    """Parse YAML 1.2 as DVC does (only true/false are booleans); a key given twice raises `DuplicateKeyError`."""
    return YAML(typ="safe", pure=True).load(text)


def _duplicate_key(e: DuplicateKeyError) -> str:
    found = re.search(r'duplicate key "(.*?)"', e.problem or "")
    return found.group(1) if found else "?"


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    if err["type"] == "value_error":  # a validator's own message names what is wrong
        return (f"{key}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
    return f"{key}: {err['msg']} (got {err.get('input')!r})"
