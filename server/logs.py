"""The log pipeline of ``vm-tenant serve``: structlog in front of stdlib ``logging``, one sink.

Every line ends in one :class:`LogSink` (stderr's file descriptor): the request log (a
structlog logger made by :func:`serving_log`), the two start-up lines
(:func:`announce`) and every plain ``logging`` call of the code and of its libraries,
through a root handler whose formatter is structlog's
:class:`~structlog.stdlib.ProcessorFormatter`. They come out alike, one JSON object a line,
or as readable console lines when a person is watching.

Writing a log line can never change an answer: a line the sink cannot write (a full
disk, ``/dev/full``, a closed pipe) is dropped and counted
(``vm_tenant_log_lines_dropped_total``), and nothing on the way to it (rendering
included) raises into a request or an actor. Nothing here configures structlog globally;
the request logger is built explicitly and handed to whoever logs requests.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO, TextIO

import msgspec
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from structlog.typing import EventDict, Processor, WrappedLogger

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: keys whose values never reach a log line, whoever puts them in an event
SECRET_KEYS = frozenset({"authorization", "token", "admin_token", "password", "secret"})
#: the logger of the start-up lines and of the serve command's own events
SERVE_LOGGER = "vm_tenant"

_encoder = msgspec.json.Encoder(enc_hook=str)


class LogSink:
    """Where log lines are written: a file descriptor (stderr) or a binary stream.

    :meth:`write` never raises. A line that cannot be written, wholly or in part, is
    counted in :attr:`dropped`; after a part of a line went out, the next line starts on
    a new line so that the two do not run together.
    """

    def __init__(self, target: int | BinaryIO = 2) -> None:
        self._fd = target if isinstance(target, int) else None
        self._stream = None if isinstance(target, int) else target
        try:
            self.isatty = os.isatty(target) if isinstance(target, int) else target.isatty()
        except (OSError, ValueError):
            self.isatty = False
        self.dropped = 0
        self._cut = False
        # lines come from the event loop and, through ``logging``, from worker threads
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        """Write one line (with its newline) or count it as dropped."""
        with self._lock:
            if self._cut:
                line = b"\n" + line
            sent = 0
            try:
                if self._fd is None:
                    assert self._stream is not None
                    self._stream.write(line)
                    self._stream.flush()
                    sent = len(line)
                else:
                    view = memoryview(line)
                    while sent < len(line):
                        sent += os.write(self._fd, view[sent:])
            except (OSError, ValueError):
                self.dropped += 1
                # a part of this line went out: it is the one left unterminated now
                # (nothing went out: an earlier cut line still is)
                self._cut = self._cut or sent > 0
            else:
                self._cut = False

    def drop(self) -> None:
        """Count a line that was lost before it reached the sink (it could not be rendered)."""
        with self._lock:
            self.dropped += 1


class SinkStream(io.TextIOBase):
    """A text stream over a sink, to stand in for ``sys.stderr`` while the server runs.

    Whatever still writes to ``sys.stderr`` directly (a library's ``print``, an
    interpreter message) then cannot raise either, nor leave unflushed bytes behind that
    fail again at exit.
    """

    # class attributes: TextIOBase's own are read-only (and say None)
    encoding = "utf-8"
    errors = "backslashreplace"

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._sink.isatty

    def write(self, text: str) -> int:
        self._sink.write(text.encode("utf-8", "backslashreplace"))
        return len(text)


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Mask values of keys that name a secret (defence in depth: none is logged on purpose)."""
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def _dumps(event: Any, **_: Any) -> str:
    return _encoder.encode(event).decode()


def _dumps_bytes(event: Any, **_: Any) -> bytes:
    return _encoder.encode(event)


SHARED: list[Processor] = [
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    redact_secrets,
]


def resolve_format(fmt: str, stream: TextIO | LogSink) -> str:
    """``auto`` becomes ``console`` on a terminal and ``json`` anywhere else."""
    if fmt == "auto":
        tty = stream.isatty if isinstance(stream, LogSink) else stream.isatty()
        return "console" if tty else "json"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    return fmt


def level_number(level: str) -> int:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return logging.getLevelNamesMapping()[level.upper()]


def formatter(fmt: str, stream: TextIO | LogSink) -> structlog.stdlib.ProcessorFormatter:
    """The formatter that renders every record, structlog's and stdlib's, in ``fmt``."""
    final: list[Processor]
    if resolve_format(fmt, stream) == "json":
        final = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(_dumps)]
    else:
        tty = stream.isatty if isinstance(stream, LogSink) else stream.isatty()
        final = [structlog.dev.ConsoleRenderer(colors=tty)]
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        foreign_pre_chain=SHARED,
    )


class SinkHandler(logging.Handler):
    """The root handler: renders a record in the chosen format and writes it to the sink.

    It never raises and never calls ``handleError`` (which would write a traceback to the
    very stream that just failed): a record that cannot be rendered or written is dropped
    and counted.
    """

    def __init__(self, sink: LogSink, fmt: str) -> None:
        super().__init__()
        self.sink = sink
        self.format_name = resolve_format(fmt, sink)
        self.setFormatter(formatter(self.format_name, sink))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "backslashreplace")
        except Exception:
            self.sink.drop()
            return
        self.sink.write(line + b"\n")


def configure_logging(
    fmt: str,
    stream: TextIO | None = None,
    level: int | str = logging.INFO,
    *,
    take_stderr: bool = False,
) -> LogSink:
    """Send every log record of the process to stderr (or ``stream``) in ``fmt``.

    Returns the sink. With ``take_stderr``, ``sys.stderr`` itself becomes a stream over
    the sink and Python's warnings go through ``logging``, so that nothing in the
    process writes to stderr in a way that could raise.
    """
    sink = LogSink(2 if stream is None else stream.buffer)
    handler = SinkHandler(sink, fmt)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_number(level) if isinstance(level, str) else level)
    if take_stderr:
        logging.captureWarnings(True)
        sys.stderr = SinkStream(sink)
    return sink


def _root_handler() -> SinkHandler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, SinkHandler):
            return handler
    return None


def announce(event: str, **fields: Any) -> None:
    """Write one of the start-up lines, in the log format, whatever the log level.

    ``event`` is the line's fixed text (``vm-tenant listening on URL``), which scripts
    look for; ``fields`` add its parts as members.
    """
    handler = _root_handler()
    sink, fmt = (LogSink(), "auto") if handler is None else (handler.sink, handler.format_name)
    line = direct_request_logger(fmt, sink=sink, name=SERVE_LOGGER, level=logging.DEBUG)
    line.info(event, **fields)


# -- the request log of a running server ---------------------------------------------------------


def _add_logger_name(name: str) -> Processor:
    def add(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event["logger"] = name
        return event

    return add


class _SinkLogger:
    """What structlog writes its rendered lines to: the sink, one line per call."""

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink

    def msg(self, message: str | bytes) -> None:
        data = message if isinstance(message, bytes) else message.encode("utf-8", "replace")
        self._sink.write(data + b"\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _never_raising(level: int, sink: LogSink) -> type[Any]:
    """A level-filtering bound logger whose calls never raise (a failure drops the line)."""
    base: Any = structlog.make_filtering_bound_logger(level)

    class NeverRaising(base):  # type: ignore[misc]  # structlog makes the class at run time
        def _proxy_to_logger(self, method_name: str, event: Any = None, **event_kw: Any) -> Any:
            try:
                return super()._proxy_to_logger(method_name, event, **event_kw)
            except Exception:
                sink.drop()
                return None

    return NeverRaising


def direct_request_logger(
    fmt: str,
    stream: TextIO | None = None,
    name: str = "vm_tenant.request",
    *,
    sink: LogSink | None = None,
    level: int = logging.INFO,
) -> Any:
    """The request log of a running server: the same lines, written without ``logging``.

    One line per request is the busiest log there is, and a trip through stdlib
    ``logging`` (a LogRecord, the handler's lock, the formatter) costs several times what
    rendering the line does; this logger renders and writes it directly to the sink.
    Levels below ``level`` cost one no-op call.
    """
    if sink is None:
        sink = LogSink(2 if stream is None else stream.buffer)
    head: list[Processor] = [
        structlog.processors.add_log_level,
        _add_logger_name(name),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Processor
    if resolve_format(fmt, sink) == "json":
        renderer = structlog.processors.JSONRenderer(_dumps_bytes)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sink.isatty)
    return structlog.wrap_logger(
        _SinkLogger(sink),
        processors=[*head, renderer],
        wrapper_class=_never_raising(level, sink),
    )


class DroppedLines(Collector):
    """``vm_tenant_log_lines_dropped_total``: log lines the sink could not write."""

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "vm_tenant_log_lines_dropped",
            "Log lines dropped because they could not be written (e.g. stderr on a full disk).",
            value=self._sink.dropped,
        )


def serving_log(registry: CollectorRegistry) -> Any:
    """The request logger of a running server, over the sink :func:`configure_logging` set up.

    The sink's count of dropped lines is exported through ``registry``.
    """
    handler = _root_handler()
    if handler is None:
        raise RuntimeError("configure_logging() must run first")
    registry.register(DroppedLines(handler.sink))
    level = logging.getLogger().getEffectiveLevel()
    return direct_request_logger(handler.format_name, sink=handler.sink, level=level)


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
