"""Common entry for stage modules: load params, run, turn user errors into one clear line (exit 2)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from components.errors import FiresightError
from pipelines.params import Params, load_params


def run_stage(name: str, stage: Callable[[Params], None]) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    for chatty in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", ...
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        stage(load_params())
    except FiresightError as e:
        print(f"firesight {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
