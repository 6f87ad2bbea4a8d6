"""Logging: one event a line, with site, job and round in each, unbuffered; optionally JSON lines.

Loggers get context through :func:`adapter` (``log = adapter("fl.site", site="site-1", job=...)``);
the formatter prints ``[site job=... round=1/2]`` for whichever fields a record has. A record's
``round`` is the 0-based round index and ``num_rounds`` the job's rounds (:func:`fl.rounds.log_round`);
text shows them as people count (``round=1/2``, ``round=final``), JSON lines keep both numbers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from fl.rounds import round_tag

__all__ = ["ContextAdapter", "adapter", "setup_logging"]

_FIELDS = ("site", "job", "round", "num_rounds")


class ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds fixed context (site, job, round) to every record; ``bind`` makes a narrower one."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs

    def bind(self, **fields: Any) -> ContextAdapter:
        return ContextAdapter(self.logger, {**(self.extra or {}), **fields})


def adapter(name: str, **fields: Any) -> ContextAdapter:
    return ContextAdapter(logging.getLogger(name), fields)


def _context(record: logging.LogRecord) -> str:
    parts: list[str] = []
    site = getattr(record, "site", None)
    if site:
        parts.append(str(site))
    job = getattr(record, "job", None)
    if job:
        parts.append(f"job={str(job)[:8]}")
    rnd = getattr(record, "round", None)
    if rnd is not None:
        parts.append(f"round={round_tag(rnd, getattr(record, 'num_rounds', None))}")
    return f"[{' '.join(parts)}] " if parts else ""


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<7} {_context(record)}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                obj[field] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class _FlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes after every record (kubectl logs shows lines as they happen)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


def setup_logging(fmt: str = "text", level: str | int = "INFO", stream: Any = None) -> None:
    """Configure the ``fl`` loggers once for a process (idempotent)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    root = logging.getLogger("fl")
    for handler in list(root.handlers):
        if getattr(handler, "_fl_handler", False):
            root.removeHandler(handler)
    handler = _FlushingHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._fl_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    root.propagate = False
