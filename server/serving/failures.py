"""The errors that ended a connection: counted, and logged without flooding the log."""

from __future__ import annotations

import logging

Address = tuple[str, int]


class ConnectionFailures:
    """Counts and logs the errors that ended a connection (one owner: the server).

    The first error of each kind is logged with its traceback; later ones of that kind
    with one line, so that a peer who can provoke one cannot flood the log with stacks.
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._seen: set[str] = set()
        self.count = 0

    def report(self, peer: Address | None, error: BaseException) -> None:
        self.count += 1
        kind = _kind(error)
        where = f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
        if kind in self._seen:
            self._log.error("connection failed (peer %s): %s: %s", where, kind, error)
            return
        self._seen.add(kind)
        self._log.error("connection failed (peer %s): %s", where, kind, exc_info=error)


def _kind(error: BaseException) -> str:
    """The names of the errors inside ``error``'s groups, e.g. ``"KeyError"``."""
    if isinstance(error, BaseExceptionGroup):
        return ", ".join(sorted({_kind(inner) for inner in error.exceptions}))
    return type(error).__qualname__
