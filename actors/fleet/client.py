"""The fleet client actor and the small interface its drivers implement.

The :class:`FleetClient` owns the driver (opened and closed inside its own nursery) and a
fixed pool of worker tasks reading one bounded mailbox, so the number of calls in flight
to the fleet is bounded and each call has a deadline. Its :class:`CircuitBreaker` turns
a fleet that keeps failing into fast refusals for a cool-down. Callers get a definite
answer, a :class:`~actors.errors.FleetError` (the fleet said no) or
:class:`~actors.errors.FleetUnavailable` (the call was not made: nothing happened), or a
:class:`~actors.errors.FleetInDoubt` (the call may or may not have taken effect).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import outcome
import trio

from actors.errors import FleetError, FleetInDoubt, FleetUnavailable
from actors.fleet.breaker import CircuitBreaker
from actors.reply import Reply
from actors.state import VmSpec

if TYPE_CHECKING:
    from actors.metrics import Metrics

log = logging.getLogger("vm_tenant.fleet")


class FleetDriver(Protocol):
    """How the fleet client talks to one kind of fleet controller.

    ``spawn`` is idempotent on ``vm_id`` (a repeated spawn of the same id never creates a
    second VM) and returns the VM's state; ``destroy`` of a VM the fleet does not know
    succeeds; ``status`` returns ``None`` for a VM the fleet does not know. Definite
    refusals raise ``FleetError``; anything else that goes wrong raises ``FleetInDoubt``.
    """

    async def spawn(self, vm_id: str, tenant: str, spec: VmSpec) -> str: ...

    async def destroy(self, vm_id: str) -> None: ...

    async def status(self, vm_id: str) -> str | None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    reply: Reply


class FleetClient:
    """The actor in front of the fleet driver: bounded in-flight calls, per-call deadline."""

    def __init__(
        self,
        driver: FleetDriver,
        *,
        workers: int = 64,
        timeout: float = 10.0,
        queue: int = 1024,
        breaker: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
        status_timeout: float = 2.0,
    ) -> None:
        self.driver = driver
        self._metrics = metrics
        self.timeout = timeout
        #: a status read is an answer to a GET: it gives up sooner than a write would
        self.status_timeout = min(status_timeout, timeout)
        self.breaker = breaker or CircuitBreaker()
        self._workers = workers
        self._reads = 0
        self._send, self._receive = trio.open_memory_channel[_Call](queue)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve calls until :meth:`close`; then finish the queued ones and close the driver."""
        try:
            async with trio.open_nursery() as nursery:
                with self._receive:
                    for _ in range(self._workers):
                        nursery.start_soon(self._worker, self._receive.clone())
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.driver.aclose()

    def close(self) -> None:
        self._send.close()

    async def _worker(self, receive: trio.MemoryReceiveChannel[_Call]) -> None:
        with receive:
            async for call in receive:
                result: outcome.Outcome[Any] = outcome.Error(
                    FleetInDoubt("the fleet did not answer in time")
                )
                started = time.perf_counter()
                with trio.move_on_after(self.timeout) as deadline:
                    result = await self._invoke(call.fn, *call.args)
                self._settled(call.fn, result, started, deadline.cancelled_caught)
                # A caller that gave up is gone; its reconciler will ask again.
                call.reply.send_nowait(result)

    async def _invoke(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(await fn(*args))
        except (FleetError, FleetUnavailable, FleetInDoubt) as error:
            return outcome.Error(error)
        except Exception:
            # A driver bug must not crash the pool; the caller cannot know what happened,
            # so the outcome is in doubt.
            log.exception("fleet driver failed")
            return outcome.Error(FleetInDoubt("the fleet driver failed"))

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if not self.breaker.allows():
            self._count_refused(fn)
            raise FleetUnavailable("the fleet is unreachable (circuit open); try again shortly")
        reply = Reply()
        try:
            self._send.send_nowait(_Call(fn, args, reply))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._count_refused(fn)
            raise FleetUnavailable("the fleet client is overloaded") from None
        # The worker answers within its own deadline; this one only guards against a
        # worker pool that stopped while the call was queued.
        with trio.move_on_after(self.timeout * 2 + 1) as scope:
            result = await reply.receive()
        if scope.cancelled_caught:
            raise FleetInDoubt("the fleet did not answer in time")
        return result.unwrap()

    def _settled(
        self, fn: Callable[..., Any], result: outcome.Outcome[Any], started: float, late: bool
    ) -> None:
        self.breaker.record(result)
        if self._metrics is not None:
            kind = "timeout" if late else _result_kind(result)
            self._metrics.fleet_call(fn.__name__, kind, time.perf_counter() - started)

    def _count_refused(self, fn: Callable[..., Any]) -> None:
        if self._metrics is not None:
            self._metrics.fleet_call(fn.__name__, "refused", None)

    def accepting(self) -> bool:
        """False while the circuit is open: calls would fail fast, so reserve nothing."""
        return self.breaker.allows()

    async def spawn(self, vm_id: str, tenant: str, spec: VmSpec) -> str:
        return await self._call(self.driver.spawn, vm_id, tenant, spec)

    async def destroy(self, vm_id: str) -> None:
        await self._call(self.driver.destroy, vm_id)

    async def status(self, vm_id: str) -> str | None:
        """The fleet's view of one VM, asked in the caller's own task.

        A read changes nothing and needs no ordering, so it skips the workers' mailbox
        (a hand-off that costs more than the embedded fleet's whole answer); reads in
        flight have their own bound, and their failures count toward the breaker alike.
        """
        if not self.breaker.allows():
            self._count_refused(self.driver.status)
            raise FleetUnavailable("the fleet is unreachable (circuit open); try again shortly")
        if self._reads >= self._workers:
            self._count_refused(self.driver.status)
            raise FleetUnavailable("too many status reads in flight")
        result: outcome.Outcome[Any] = outcome.Error(
            FleetInDoubt("the fleet did not answer in time")
        )
        self._reads += 1
        started = time.perf_counter()
        try:
            with trio.move_on_after(self.status_timeout) as deadline:
                result = await self._invoke(self.driver.status, vm_id)
        finally:
            self._reads -= 1
        self._settled(self.driver.status, result, started, deadline.cancelled_caught)
        return result.unwrap()


def _result_kind(result: outcome.Outcome[Any]) -> str:
    """The ``result`` label of a fleet call's outcome (see ``actors/metrics.py``)."""
    if isinstance(result, outcome.Value):
        return "ok"
    error = result.error
    if isinstance(error, FleetInDoubt):
        return "in_doubt"
    if isinstance(error, FleetUnavailable):
        return "unavailable"
    return "error"
