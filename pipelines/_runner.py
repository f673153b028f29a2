"""Common entry for stage modules: load params, run, turn user errors into one clear line (exit 2)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from components.errors import FiresightError
from components.redact import RedactingFilter, redact
from pipelines.params import Params, load_params


def run_stage(name: str, stage: Callable[[Params], None]) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # no log line carries a credential (a URI's user:password, ...)
        handler.addFilter(RedactingFilter())
    for chatty in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", ...
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        stage(load_params())
    except FiresightError as e:
        print(f"firesight {name}: error: {redact(e)}", file=sys.stderr)
        sys.exit(2)
