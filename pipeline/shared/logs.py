"""The runtimes' logging: JSON lines on stderr (and a file, for a console run)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: easy to ship, easy to grep."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", file: Path | None = None) -> None:
    """JSON lines on stderr; with ``file`` (a console run), the log goes there and stderr
    keeps only warnings, so the log does not drown the story."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    handlers: list[logging.Handler] = [handler]
    if file is not None:
        handler.setLevel(logging.WARNING)
        file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(file, encoding="utf-8")
        to_file.setFormatter(JsonLogFormatter())
        handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # Faust's services log every start and stop under their classes' modules
    for noisy in ("amqtt", "transitions", "asyncio", "kafka", "aiokafka", "faust", "mode",
                  "connectors.faust_bulk", "pipeline.runtimes.worker", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
