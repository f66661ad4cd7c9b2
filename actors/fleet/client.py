"""The fleet client and the small interface its drivers implement.

The :class:`FleetClient` owns the driver (open while :meth:`FleetClient.run` runs, closed
after the tenant actors drained) and its :class:`CircuitBreaker`, which turns a fleet that
keeps failing into fast refusals for a cool-down. A call runs in the caller's own task
(a tenant's job, a GET): there is nothing to order between calls (each is idempotent by
VM id, and a VM has one operation at a time), so a hand-off to a worker pool would only
add a scheduling round and a reply to every spawn and destroy. What a pool gave is kept:
at most ``concurrency`` writes in flight (further ones wait their turn, at most
``queue`` of them; beyond that the fleet is overloaded and the call is refused) and a
deadline per call. Callers get a definite answer, a :class:`~actors.errors.FleetError`
(the fleet said no) or :class:`~actors.errors.FleetUnavailable` (the call was not made:
nothing happened), or a :class:`~actors.errors.FleetInDoubt` (the call may or may not
have taken effect).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import outcome
import trio

from actors.errors import FleetError, FleetInDoubt, FleetUnavailable
from actors.fleet.breaker import CircuitBreaker
from actors.state import VmSpec

if TYPE_CHECKING:
    from actors.metrics import Metrics

log = logging.getLogger("vm_tenant.fleet")


class FleetDriver(Protocol):
    """How the fleet client talks to one kind of fleet controller.

    ``spawn`` is idempotent on ``vm_id`` (a repeated spawn of the same id never creates a
    second VM) and returns the VM's state; ``destroy`` of a VM the fleet does not know
    succeeds; ``status`` returns ``None`` for a VM the fleet does not know; ``list``
    returns the state of every VM the fleet holds for a tenant, by id. Definite refusals
    raise ``FleetError``; anything else that goes wrong raises ``FleetInDoubt``.
    """

    async def spawn(self, vm_id: str, tenant: str, spec: VmSpec) -> str: ...

    async def destroy(self, vm_id: str) -> None: ...

    async def status(self, vm_id: str) -> str | None: ...

    async def list(self, tenant: str) -> dict[str, str]: ...

    async def aclose(self) -> None: ...


class FleetClient:
    """The fleet driver behind a breaker, bounded calls in flight, and a deadline per call."""

    def __init__(
        self,
        driver: FleetDriver,
        *,
        concurrency: int = 64,
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
        self._concurrency = concurrency
        self._queue = queue
        self._writes = trio.Semaphore(concurrency)
        self._reads = 0
        self._closed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the driver open until :meth:`close`, then close it."""
        task_status.started()
        try:
            await self._closed.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self.driver.aclose()

    def close(self) -> None:
        """The callers are done (the tenant actors drained): close the driver."""
        self._closed.set()

    def accepting(self) -> bool:
        """False while the circuit is open: calls would fail fast, so reserve nothing."""
        return self.breaker.allows()

    async def spawn(self, vm_id: str, tenant: str, spec: VmSpec) -> str:
        state: str = await self._write(self.driver.spawn, vm_id, tenant, spec)
        return state

    async def destroy(self, vm_id: str) -> None:
        await self._write(self.driver.destroy, vm_id)

    async def status(self, vm_id: str) -> str | None:
        """The fleet's view of one VM.

        A read answers a GET: beyond ``concurrency`` reads in flight it is refused at once
        rather than queued, and it gives up after ``status_timeout``.
        """
        state: str | None = await self._read(self.driver.status, self.status_timeout, vm_id)
        return state

    async def states(self, tenant: str) -> dict[str, str]:
        """The fleet's state of every VM it holds for ``tenant`` (the state sync's read).

        Admitted like :meth:`status` (the breaker, the reads in flight), with the write
        deadline: one answer may carry thousands of VMs.
        """
        states: dict[str, str] = await self._read(self.driver.list, self.timeout, tenant)
        return states

    async def _read(self, fn: Callable[..., Awaitable[Any]], seconds: float, arg: str) -> Any:
        """A read: admitted by the breaker, refused at once beyond ``concurrency`` reads in
        flight (never queued), given up after ``seconds``."""
        self._admit(fn)
        if self._reads >= self._concurrency:
            self._count_refused(fn)
            raise FleetUnavailable("too many fleet reads in flight")
        self._reads += 1
        try:
            result = await self._timed(fn, seconds, arg)
        finally:
            self._reads -= 1
        return result.unwrap()

    async def _write(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        self._admit(fn)
        try:
            self._writes.acquire_nowait()
        except trio.WouldBlock:
            if self._writes.statistics().tasks_waiting >= self._queue:
                self._count_refused(fn)
                raise FleetUnavailable("the fleet client is overloaded") from None
            await self._writes.acquire()
        try:
            result = await self._timed(fn, self.timeout, *args)
        finally:
            self._writes.release()
        return result.unwrap()

    def _admit(self, fn: Callable[..., Any]) -> None:
        if not self.breaker.allows():
            self._count_refused(fn)
            raise FleetUnavailable("the fleet is unreachable (circuit open); try again shortly")

    async def _timed(
        self, fn: Callable[..., Awaitable[Any]], seconds: float, *args: Any
    ) -> outcome.Outcome[Any]:
        """Call ``fn`` with a deadline of ``seconds``; the breaker and metrics count it."""
        result: outcome.Outcome[Any] = outcome.Error(
            FleetInDoubt("the fleet did not answer in time")
        )
        started = time.perf_counter()
        with trio.move_on_after(seconds) as deadline:
            result = await self._invoke(fn, *args)
        self.breaker.record(result)
        if self._metrics is not None:
            kind = "timeout" if deadline.cancelled_caught else _result_kind(result)
            self._metrics.fleet_call(fn.__name__, kind, time.perf_counter() - started)
        return result

    @staticmethod
    async def _invoke(fn: Callable[..., Awaitable[Any]], *args: Any) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(await fn(*args))
        except (FleetError, FleetUnavailable, FleetInDoubt) as error:
            return outcome.Error(error)
        except Exception:
            # A driver bug must not crash the caller; it cannot know what happened, so
            # the outcome is in doubt.
            log.exception("fleet driver failed")
            return outcome.Error(FleetInDoubt("the fleet driver failed"))

    def _count_refused(self, fn: Callable[..., Any]) -> None:
        if self._metrics is not None:
            self._metrics.fleet_call(fn.__name__, "refused", None)


def _result_kind(result: outcome.Outcome[Any]) -> str:
    """The ``result`` label of a fleet call's outcome (see ``actors/metrics.py``)."""
    if not isinstance(result, outcome.Error):
        return "ok"
    error = result.error
    if isinstance(error, FleetInDoubt):
        return "in_doubt"
    if isinstance(error, FleetUnavailable):
        return "unavailable"
    return "error"
