"""Worker log output: one line per event, plain text or JSON lines (``DYN_LOGGING_JSONL``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

TRUE_STRINGS = frozenset({"true", "1", "yes", "on"})


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def jsonl_requested() -> bool:
    raw = os.environ.get("ARMATURE_LOGGING_JSONL") or os.environ.get("DYN_LOGGING_JSONL") or ""
    return raw.strip().lower() in TRUE_STRINGS


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if jsonl_requested():
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
