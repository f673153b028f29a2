"""Training loops and job factories for the search tests; a module of its own so Ray workers can import them by name."""

import dataclasses
from pathlib import Path

from components.registry import Spec
from components.training.jobs import RetrievalJob
from components.training.retrieval import train_retrieval

FAILING_POS_MARGIN = 0.6
POS, NEG = "retrieval.criterion.args.pos_margin", "retrieval.criterion.args.neg_margin"


@dataclasses.dataclass(frozen=True)
class WithMargins:
    """A job factory for margin points: `job` with the point's (m+, m−) in its criterion."""

    job: RetrievalJob

    def __call__(self, point: dict) -> RetrievalJob:
        args = {**self.job.criterion.args, "pos_margin": point[POS], "neg_margin": point[NEG]}
        return dataclasses.replace(self.job, criterion=Spec(self.job.criterion.name, args))


def recording_loop(job: RetrievalJob, ctx) -> None:
    """train_retrieval that first records its margins and lr in runs.log beside its images' class folders (one line
    per run of a trial), and crashes for m+ = FAILING_POS_MARGIN."""
    margins = job.criterion.args
    if ctx.rank == 0:
        with open(Path(job.train.uris[0]).parents[1] / "runs.log", "a") as log:
            log.write(f"{margins['pos_margin']} {margins['neg_margin']} {job.optim.lr}\n")
    if margins["pos_margin"] == FAILING_POS_MARGIN:
        raise RuntimeError(f"injected crash for m+ = {margins['pos_margin']}")
    train_retrieval(job, ctx)


def margin_grid(pos: tuple, neg: tuple, epochs: int = 1, concurrent: int = 1):
    from components.search_space import Dimension, SearchSpace
    from components.tuning import ParamSearch

    space = SearchSpace((Dimension(POS, pos, 0.0, 1.0), Dimension(NEG, neg, 0.6, 1.6, above=POS, gap=0.05)))
    return ParamSearch("grid", space, num_trials=4, epochs_per_trial=epochs, max_concurrent_trials=concurrent,
                       driver_cpus=0.25, asha_grace_period=None)


def search_in_this_process(workdir: str) -> None:
    """Run the interruption test's search (grid m+ 0.3 then 0.4, m− 1.2, one trial at a time) on the images and
    job saved in `workdir`; exit 2 with one line if it stops early. Entry point of a subprocess the test signals."""
    import pickle
    import sys

    from components.distributed import Cluster
    from components.errors import FiresightError
    from components.tuning import run_search

    job = pickle.loads((Path(workdir) / "job.pkl").read_bytes())  # written by the test itself
    try:
        run_search(recording_loop, WithMargins(job), margin_grid((0.3, 0.4), (1.2,)),
                   cluster=Cluster(1, 1, storage_path=f"{workdir}/ray"), name="search")
    except FiresightError as e:
        print(f"search stopped: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    import sys

    search_in_this_process(sys.argv[1])
