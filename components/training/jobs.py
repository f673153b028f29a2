"""What a training job is: the network to start from, the optimisation, the images, and (retrieval) the loss,
sampler and miner as registry specs. Jobs are plain frozen dataclasses: Ray ships them to every worker."""

from __future__ import annotations

from dataclasses import dataclass

from components.models.spec import NetSpec
from components.registry import Spec


@dataclass(frozen=True)
class Optimisation:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_step_epochs: int
    lr_gamma: float
    train_max_side: tuple[int, int]
    hflip: bool
    seed: int
    head_lr_multiplier: float = 1.0
    rotation_degrees: float = 0.0
    color_jitter: float = 0.0


@dataclass(frozen=True)
class LabelledImages:
    uris: list[str]
    labels: list[int]


@dataclass(frozen=True)
class RetrievalValSet:
    """Images of held-out classes: queries are searched against the rest (the database)."""

    uris: list[str]
    labels: list[int]
    is_query: list[bool]


@dataclass(frozen=True)
class ClassifyJob:
    net: NetSpec
    optim: Optimisation
    classes: list[str]
    train: LabelledImages
    val: LabelledImages
    retrieval_val: RetrievalValSet
    eval_batch_size: int = 32
    audit_dir: str | None = None


@dataclass(frozen=True)
class RetrievalJob:
    """criterion: a `components.losses.LOSSES` entry; sampler: a `components.training.batches.SAMPLERS` entry (how
    each epoch's batches are drawn); miner: an optional `components.miners.MINERS` entry that picks the pairs or
    triplets of each batch the loss sees (else the sampler's pairs, or all of the batch's)."""

    net: NetSpec
    optim: Optimisation
    train: LabelledImages
    retrieval_val: RetrievalValSet
    criterion: Spec
    sampler: Spec
    miner: Spec | None = None
    eval_batch_size: int = 32
    audit_dir: str | None = None
    measure_start: bool = True  # evaluate the starting model as epoch 0 (a margin-search trial skips it)
    cache_frozen_trunk: bool = False  # compute the frozen trunk once (components/training/feature_cache.py)
