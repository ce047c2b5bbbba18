"""Logging set-up shared by every process: readable lines, or one JSON object per line when asked.

A session id and plan epoch live in context variables, so every record logged while a request is
handled carries them and a request can be followed across boxes by grepping one id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("splitmesh_session", default="")
EPOCH: contextvars.ContextVar[int] = contextvars.ContextVar("splitmesh_epoch", default=0)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session = SESSION.get()
        record.epoch = EPOCH.get()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "component": self.component, "logger": record.name,
            "msg": record.getMessage(),
        }
        session, epoch = getattr(record, "session", ""), getattr(record, "epoch", 0)
        if session:
            doc["session"] = session
        if epoch:
            doc["epoch"] = epoch
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(component: str, level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s [{component}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
