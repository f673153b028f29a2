"""Common entry for stage modules: load params, run the stage on the keys dvc.yaml declares for it (reading any
other raises; see pipelines/params_view.py), say in one line how it went.

By default the terminal shows Firesight's own progress (a bar per training epoch, the margin search's trials), its
warnings and one summary line per stage (its time and result: the stage module's last INFO line); everything else
the stage prints or logs (Ray's and MLflow's records, Ray workers' output, Python warnings, tables) goes to
logs/<stage>.log, which that line names. FIRESIGHT_VERBOSE=1 sends everything to the terminal instead. No log line
carries a credential (a URI's user:password, ...).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from components.errors import FiresightError
from components.redact import RedactingFilter, redact
from pipelines.params import Params, load_params
from pipelines.params_view import restricted_params

LOG_DIR = Path("logs")
VERBOSE = "FIRESIGHT_VERBOSE"
INTERRUPTED = 130  # a shell's exit code for Ctrl-C (128 + SIGINT)
OWN_LOGGERS = ("__main__", "components", "pipelines")


def run_stage(name: str, stage: Callable[[Params], None]) -> None:
    """Run `stage` on the params dvc.yaml declares for stage `name` (all of them where dvc.yaml or the stage is
    missing), then one line on the terminal: done (exit 0), a user error (exit 2; an undeclared params key is one),
    interrupted (exit 130) or failed (exit 1, its traceback in the log)."""
    start = time.perf_counter()
    log_file = route_output(name)
    result = _LastResult()
    logging.getLogger().addHandler(result)
    where = f" (log: {log_file})" if log_file else ""
    try:
        stage(restricted_params(load_params(), name))
    except FiresightError as e:
        say(f"firesight {name}: error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        say(f"firesight {name}: interrupted; nothing was recorded for this stage — run it again")
        sys.exit(INTERRUPTED)
    except Exception as e:
        print(redact(traceback.format_exc()), file=sys.stderr, flush=True)  # the log's, or the terminal's
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        say(f"firesight {name}: failed: {type(e).__name__}: {first_line}{where}")
        sys.exit(1)
    say(f"firesight {name}: done in {time.perf_counter() - start:.1f} s{result.message}{where}")


class _LastResult(logging.Handler):
    """The stage module's last INFO message (`__main__`: the module run), as "; <message>"."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "__main__" and record.levelno == logging.INFO:
            self.message = f"; {record.getMessage()}"


def route_output(name: str) -> Path | None:
    """Send logging (Python warnings included), stdout and stderr to logs/<name>.log, Firesight's own warnings to
    the terminal too, and return the log's path; with FIRESIGHT_VERBOSE=1 all of it to the terminal and None.

    The redirection is of the file descriptors 1 and 2 themselves, so what native code writes there (Ray's core
    worker, and the Ray processes this one starts, which inherit them) goes to the log as well; `sys.__stderr__`
    becomes a copy of the terminal's descriptor, where progress bars and the stage's line are written."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    log_file = None
    if os.environ.get(VERBOSE) != "1":
        LOG_DIR.mkdir(exist_ok=True)
        log_file = LOG_DIR / f"{name}.log"
        log = open(log_file, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        terminal = os.fdopen(os.dup(sys.__stderr__.fileno()), "w", buffering=1, encoding="utf-8",
                             errors="backslashreplace")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        sys.__stderr__ = terminal
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray prefixes workers' lines without terminal colours
        handlers = [logging.StreamHandler(sys.stderr), logging.StreamHandler(sys.__stderr__)]
        handlers[1].setLevel(logging.WARNING)
        handlers[1].addFilter(lambda record: record.name.split(".")[0] in OWN_LOGGERS)
        handlers[1].setFormatter(logging.Formatter(f"firesight {name}: %(levelname)s %(message)s"))
    for handler in handlers:
        handler.addFilter(RedactingFilter())
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", handlers=handlers,
                        force=True)
    logging.captureWarnings(True)
    for chatty in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", ...
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return log_file


def say(line: str) -> None:
    """One line on the terminal, and in the stage's log when it has one."""
    print(redact(line), file=sys.__stderr__, flush=True)
    if sys.stderr is not sys.__stderr__:
        print(redact(line), file=sys.stderr, flush=True)
