"""Training loops for the margin-search tests; a module of its own so Ray workers can import them by name."""

from pathlib import Path

from components.training.jobs import RetrievalJob
from components.training.retrieval import train_retrieval

FAILING_POS_MARGIN = 0.6


def recording_loop(job: RetrievalJob, ctx) -> None:
    """train_retrieval that first records its margins in job.audit_dir/runs.log (one line per run of a trial) and
    crashes for m+ = FAILING_POS_MARGIN."""
    if ctx.rank == 0:
        with open(Path(job.audit_dir) / "runs.log", "a") as log:
            log.write(f"{job.criterion.args['pos_margin']} {job.criterion.args['neg_margin']}\n")
    if job.criterion.args["pos_margin"] == FAILING_POS_MARGIN:
        raise RuntimeError(f"injected crash for m+ = {job.criterion.args['pos_margin']}")
    train_retrieval(job, ctx)


def search_in_this_process(workdir: str) -> None:
    """Run the interruption test's search (grid m+ 0.3 then 0.4, m− 1.2, one trial at a time) on the images and
    job saved in `workdir`; exit 2 with one line if it stops early. Entry point of a subprocess the test signals."""
    import pickle
    import sys

    from components.distributed import Cluster
    from components.errors import FiresightError
    from components.tuning import MarginSearch, run_margin_search

    job = pickle.loads((Path(workdir) / "job.pkl").read_bytes())  # written by the test itself
    search = MarginSearch("grid", (0.3, 0.4), (1.2,), (0.0, 1.0), (0.6, 1.6), 2, 1, 1, 0.25, None)
    try:
        run_margin_search(recording_loop, job, search, cluster=Cluster(1, 1, storage_path=f"{workdir}/ray"), name="search")
    except FiresightError as e:
        print(f"search stopped: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    import sys

    search_in_this_process(sys.argv[1])
