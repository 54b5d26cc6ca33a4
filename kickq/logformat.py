"""Log output for kickq's commands: the usual text lines, or one JSON object per line.

A JSON line holds `time` (ISO 8601, UTC, milliseconds), `level`, `logger`, `pid`, `role` (which
process of the command wrote it: "master", "worker N", "reaper", "admin"), `message`, `job_id` and
`job_name` when the log call passed them (`extra={"job_id": ..., "job_name": ...}`), and `exc`
(the traceback, one string) when there was an exception. Newlines inside a field are escaped by
JSON, so a record is always a single line, as log shippers (journald, Loki, cloud logging) expect.

The role is process-wide: each process sets its own when it starts (`set_role`); a forked child
keeps its parent's handler and role until it sets its own.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "json")
#: The text line of kickq-supervisor.
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
#: Attributes a log call may pass with `extra=` that a JSON line carries.
JOB_FIELDS = ("job_id", "job_name")

_role: str | None = None


def set_role(role: str | None) -> None:
    """The role shown in this process's JSON lines from now on."""
    global _role
    _role = role


def current_role() -> str | None:
    return _role


def job_extra(job_id: str, job_name: str | None = None) -> dict[str, str]:
    """`extra=` for a log call about a job (its name left out when it is not known)."""
    return {"job_id": job_id, "job_name": job_name} if job_name else {"job_id": job_id}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "role": _role,
            "message": record.getMessage(),
        }
        for field in JOB_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = str(value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class _Handler(logging.StreamHandler):
    """The handler `configure` installs (so that configuring again replaces it)."""


def configure(level: int | str, log_format: str = "text", stream: TextIO | None = None,
              role: str | None = None) -> logging.Handler:
    """Send the root logger's records at `level` and above to `stream` (stderr) in `log_format`,
    replacing a handler an earlier call installed."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if role is not None:
        set_role(role)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def setup(level: int | str, log_format: str = "text", role: str | None = None) -> None:
    """A command's logging to stderr: text lines as logging.basicConfig makes them (nothing changes
    when the root logger already has a handler), or JSON lines from a handler of its own."""
    if role is not None:
        set_role(role)
    if log_format == "json":
        configure(level, "json")
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format=TEXT_FORMAT)
