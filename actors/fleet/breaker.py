"""The fleet client's circuit breaker: a fleet that keeps failing gets fast refusals."""

from __future__ import annotations

import logging
from math import inf
from typing import Any

import outcome
import trio

from actors.errors import FleetInDoubt, FleetUnavailable

log = logging.getLogger("vm_tenant.fleet")


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failed calls, for ``cooldown`` seconds.

    A failed call is one that came back in doubt (including an expired deadline) or
    never reached the fleet; a definite answer, even a refusal, closes the circuit.
    """

    def __init__(self, threshold: int = 5, cooldown: float = 5.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = -inf

    def allows(self) -> bool:
        return trio.current_time() >= self.open_until

    def record(self, result: outcome.Outcome[Any]) -> None:
        failed = isinstance(result, outcome.Error) and isinstance(
            result.error, (FleetUnavailable, FleetInDoubt)
        )
        if failed:
            self.failures += 1
            if self.failures >= self.threshold:
                if self.allows():
                    log.warning("fleet unreachable: circuit open for %.1f s", self.cooldown)
                self.open_until = trio.current_time() + self.cooldown
        else:
            self.failures = 0
