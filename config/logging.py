"""structlog set-up: JSON lines in production, readable lines in development."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from config.settings import Settings


SECRET_SHAPES = (
    (re.compile(r"ul_[A-Za-z0-9_-]{16,}"), "ul_[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[^\s'\"\\,;]+"), r"\1[redacted]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "[jwt redacted]"),
)


def redact(logger: Any, method: str, line: Any) -> Any:
    """Last step of every log line: credentials that slipped into a message never leave it.

    The farm's own events never carry a token, but a library can quote a raw request (aiohttp
    does for a malformed header) and an exception can quote its input.
    """
    if not isinstance(line, str):
        return line
    for shape, replacement in SECRET_SHAPES:
        line = shape.sub(replacement, line)
    return line


def configure_logging(settings: Settings) -> None:
    """Route structlog and stdlib logging through one renderer chosen by ``log_format``."""
    renderer: structlog.typing.Processor
    if settings.log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *([] if settings.log_format == "console"
                      else [structlog.processors.format_exc_info]),
                    renderer, redact],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # arq logs every job at INFO in its own shape; the farm logs its own per-call event instead.
    logging.getLogger("arq").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
