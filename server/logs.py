"""The log pipeline of ``vm-tenant serve``: structlog in front of stdlib ``logging``.

Everything ends in one handler on the root logger whose formatter is structlog's
:class:`~structlog.stdlib.ProcessorFormatter`: the request log (a structlog logger made
by :func:`request_logger`) and every plain ``logging`` call of the code and of its
libraries come out alike, one JSON object a line, or as readable console lines when a
person is watching. Nothing here configures structlog globally; the request logger is
built explicitly and handed to whoever logs requests.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LOG_FORMATS = ("auto", "json", "console")
#: keys whose values never reach a log line, whoever puts them in an event
SECRET_KEYS = frozenset({"authorization", "token", "admin_token", "password", "secret"})

_encoder = msgspec.json.Encoder(enc_hook=str)


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Mask values of keys that name a secret (defence in depth: none is logged on purpose)."""
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def _dumps(event: Any, **_: Any) -> str:
    return _encoder.encode(event).decode()


SHARED: list[Processor] = [
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    redact_secrets,
]


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` becomes ``console`` on a terminal and ``json`` anywhere else."""
    if fmt == "auto":
        return "console" if stream.isatty() else "json"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    return fmt


def formatter(fmt: str, stream: TextIO) -> structlog.stdlib.ProcessorFormatter:
    """The formatter that renders every record, structlog's and stdlib's, in ``fmt``."""
    final: list[Processor]
    if resolve_format(fmt, stream) == "json":
        final = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(_dumps)]
    else:
        final = [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        foreign_pre_chain=SHARED,
    )


def configure_logging(fmt: str, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send every log record of the process to ``stream`` (stderr) in ``fmt``."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt, stream))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def request_logger(name: str = "vm_tenant.request") -> Any:
    """A structlog logger over the stdlib logger ``name``, rendered by the root handler."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            *SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return logger


def _add_logger_name(name: str) -> Processor:
    def add(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event["logger"] = name
        return event

    return add


def direct_request_logger(
    fmt: str, stream: TextIO | None = None, name: str = "vm_tenant.request"
) -> Any:
    """The request log of a running server: the same lines, written without ``logging``.

    One line per request is the busiest log there is, and a trip through stdlib
    ``logging`` (a LogRecord, the handler's lock, the formatter) costs several times what
    rendering the line does; this logger renders and writes it directly.
    """
    stream = stream or sys.stderr
    head: list[Processor] = [
        structlog.processors.add_log_level,
        _add_logger_name(name),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    if resolve_format(fmt, stream) == "json":
        return structlog.wrap_logger(
            structlog.BytesLogger(stream.buffer),
            processors=[*head, structlog.processors.JSONRenderer(_dumps_bytes)],
        )
    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[*head, structlog.dev.ConsoleRenderer(colors=stream.isatty())],
    )


def _dumps_bytes(event: Any, **_: Any) -> bytes:
    return _encoder.encode(event)
