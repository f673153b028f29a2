"""Training loops for the margin-search tests; a module of its own so Ray workers can import them by name."""

from pathlib import Path

from components.training.loops import RetrievalJob, train_retrieval

FAILING_POS_MARGIN = 0.6


def recording_loop(job: RetrievalJob, ctx) -> None:
    """train_retrieval that first records its margins in job.audit_dir/runs.log (one line per run of a trial) and
    crashes for m+ = FAILING_POS_MARGIN."""
    if ctx.rank == 0:
        with open(Path(job.audit_dir) / "runs.log", "a") as log:
            log.write(f"{job.pos_margin} {job.neg_margin}\n")
    if job.pos_margin == FAILING_POS_MARGIN:
        raise RuntimeError(f"injected crash for m+ = {job.pos_margin}")
    train_retrieval(job, ctx)
