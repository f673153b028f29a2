"""The test protocols shared by the evaluate stage and the ablation, per query so that every figure can carry a
class-bootstrap CI (components.evaluation.bootstrap):

- `firearm`: DeepFirearm's — the queries (`queries_per_class` per test class) against the test database;
- `leave_one_out`: every test image queries all the others (the deep metric-learning benchmarks' protocol; many
  more queries, so much tighter intervals).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.evaluation.bootstrap import class_bootstrap_ci, paired_bootstrap_diff
from components.evaluation.metrics import per_query_scores, relevance_from_similarity
from components.search.postprocess import Reranking, reranked_similarities

_MEAN_OF = {"ap": "map"}  # a per-query figure's name -> its mean's (the others keep theirs: recall@1, map@r, ...)


@dataclass(frozen=True)
class Figures:
    """Which figures to compute: CMC@k (both protocols) and Recall@K."""

    cmc_ranks: Sequence[int] = (1, 5, 10)
    recall_ks: Sequence[int] = (1, 2, 4, 8)


@dataclass
class Scores:
    """Per-query scores of one system under each protocol, with each query's class (for resampling)."""

    per_query: dict[str, dict[str, np.ndarray]]  # protocol -> figure -> (queries,)
    classes: dict[str, np.ndarray]  # protocol -> (queries,) labels
    database: int

    def summary(self, resamples: int, confidence: float, seed: int) -> dict[str, dict]:
        """protocol -> figure -> {value, lo, hi}, plus each protocol's query count."""
        out = {}
        for protocol, scores in self.per_query.items():
            cis = class_bootstrap_ci(scores, self.classes[protocol], resamples, confidence, seed)
            out[protocol] = {**{_MEAN_OF.get(k, k): _rounded(v) for k, v in cis.items()},
                             "queries": len(self.classes[protocol])}
        out["firearm"]["database"] = self.database
        return out

    def gain_over(self, other: Scores, resamples: int, confidence: float, seed: int) -> dict[str, dict]:
        """protocol -> figure -> {diff, lo, hi}: paired on the same queries and the same resampled classes."""
        out = {}
        for protocol, scores in self.per_query.items():
            if not np.array_equal(self.classes[protocol], other.classes[protocol]):
                raise ValueError(f"{protocol}: the two systems were scored on different queries")
            diffs = paired_bootstrap_diff(scores, other.per_query[protocol], self.classes[protocol], resamples, confidence, seed)
            out[protocol] = {_MEAN_OF.get(k, k): _rounded(v) for k, v in diffs.items()}
        return out


def score_test(query_desc: np.ndarray, query_labels: Sequence, db_desc: np.ndarray, db_labels: Sequence,
               reranking: Reranking = Reranking(), figures: Figures = Figures()) -> Scores:
    """Both protocols on the test set: the queries against the database, and leave-one-out over queries + database."""
    q_labels, d_labels = np.asarray(query_labels), np.asarray(db_labels)
    sim = reranked_similarities(query_desc, db_desc, reranking)
    firearm = per_query_scores(*relevance_from_similarity(sim, q_labels, d_labels, None), figures.cmc_ranks, figures.recall_ks)
    everything = np.concatenate([query_desc, db_desc])
    labels = np.concatenate([q_labels, d_labels])
    sim = reranked_similarities(everything, everything, reranking, leave_one_out=True)
    loo = per_query_scores(*relevance_from_similarity(sim, labels, labels, np.eye(len(labels), dtype=bool)),
                           figures.cmc_ranks, figures.recall_ks)
    return Scores({"firearm": firearm, "leave_one_out": loo}, {"firearm": q_labels, "leave_one_out": labels}, len(d_labels))


def leave_one_out_map(descriptors: np.ndarray, labels: Sequence, reranking: Reranking = Reranking()) -> float:
    """Mean AP when every item queries all the others."""
    labels = np.asarray(labels)
    sim = reranked_similarities(descriptors, descriptors, reranking, leave_one_out=True)
    relevant, n_relevant = relevance_from_similarity(sim, labels, labels, np.eye(len(labels), dtype=bool))
    return float(per_query_scores(relevant, n_relevant, cmc_ranks=(1,), recall_ks=())["ap"].mean())


def _rounded(d: dict) -> dict:
    return {k: round(float(v), 6) for k, v in d.items()}
