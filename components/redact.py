"""Secrets never reach a message: one helper that redacts credentials from any text Firesight prints or logs.

Redacted: the userinfo of every URI (`http://user:secret@host` → `http://***@host`), the values of secret-looking
query parameters (`?token=…`, `X-Amz-Signature=…`, `password=…`), and the verbatim values of the credential
environment variables in `SECRET_ENV_VARS`.
"""

from __future__ import annotations

import logging
import os
import re

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "FIRESIGHT_API_TOKEN")
MASK = "***"
# userinfo runs to the authority's last "@": a password may hold an unencoded one
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/?#\s'\"]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[^=&;#\s'\"]*?)(?:token|secret|passw(?:or)?d|pwd|api[_-]?key|access[_-]?key|signature|"
    r"credential|sig|auth)[^=&;#\s'\"]*=)(?P<value>[^&;#\s'\"]+)", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4  # shorter env values would mask ordinary words


def redact(text: object) -> str:
    """`str(text)` with every credential it carries replaced by `***`."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))
    out = _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", out)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LENGTH:
            out = out.replace(value, MASK)
    return out


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (attach it to a handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_text is None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True
