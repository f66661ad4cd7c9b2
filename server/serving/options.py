"""The knobs of our HTTP serving, in one frozen value the settings layer fills in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ServingOptions:
    """Deadlines and ceilings of every listener of one ``vm-tenant serve`` process.

    Times are seconds. Defaults here are the documented defaults of ``docs/serving.md``;
    ``server.settings`` is where an operator changes them.
    """

    #: an idle connection (no request in progress) is closed after this long
    keep_alive_timeout: float = 5.0
    #: a response write that cannot finish within this long ends its connection
    send_timeout: float = 30.0
    #: in-flight requests get this long to finish after shutdown begins
    graceful_timeout: float = 25.0
