"""Structured logging, configured once: JSON lines when stderr is not a TTY, console otherwise.

Events are dotted ``noun.verb`` names (``store.received``, ``job.finished``) with snake_case keys
and units in key names. Patient data never goes into a log: only UIDs, AE titles, addresses,
counts and statuses are passed to loggers, and tracebacks are rendered without local variables.
Standard-library loggers (pynetdicom, pydicom) go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import structlog

MAX_VALUE_CHARS = 2000  # a peer's 1 MiB "UID" in a pydicom warning made 1 MiB log lines


def _clip_long_values(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            event_dict[key] = f"{value[:MAX_VALUE_CHARS]}...(+{len(value) - MAX_VALUE_CHARS} chars)"
    return event_dict


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", *, json: bool | None = None, stream=None) -> None:
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _clip_long_values,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    exc_processors = (
        [structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
        if json
        else []
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exc_processors, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # Python warnings (Celery's SecurityWarning when run as root, deprecations) as log lines, not
    # multi-line text in the middle of a JSON log
    logging.captureWarnings(True)
    # pydicom logs each of its warnings on its own logger as well: one line each, not two
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    # pynetdicom logs every PDU at INFO/DEBUG; keep it at WARNING unless debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
