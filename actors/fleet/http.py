"""The ``http`` fleet driver: a remote fleet controller speaking ``docs/fleet-api.md``.

One ``httpx.AsyncClient`` (a bounded connection pool, per-phase timeouts) lives as long as
the fleet client that owns this driver. Every call is idempotent by VM id, so a
call whose connection could not be made, or that the fleet answered ``503``, is retried
with jittered exponential backoff; the fleet client's per-call deadline bounds the whole
(and its circuit breaker turns a dead fleet into fast 503s).
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import trio

from actors.errors import FleetError, FleetInDoubt, FleetUnavailable
from actors.state import VmSpec

BASE = "/fleet/v1/vms"


class HttpFleet:
    """A fleet driver over HTTP (see ``docs/fleet-api.md``)."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 64,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        attempts: int = 4,
        backoff: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._attempts = attempts
        self._backoff = backoff
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def _send(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> httpx.Response:
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._client.request(method, path, json=body, params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
                # Nothing reached the fleet: safe to try again, and definite if we give up.
                outcome: BaseException = FleetUnavailable(f"cannot reach the fleet: {error}")
            except httpx.TransportError as error:
                raise FleetInDoubt(f"no answer from the fleet: {error!r}") from None
            else:
                if response.status_code != 503:
                    return response
                outcome = FleetUnavailable("the fleet is overloaded (503)")
            if attempt == self._attempts:
                raise outcome
            await trio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    @staticmethod
    def _definite_or_doubt(response: httpx.Response) -> Exception:
        """A fleet error with a JSON ``error`` member is definite; anything else is not."""
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, str):
            # The fleet's text goes into the audit log: keep it short and valid UTF-8.
            text = error[:500].encode("utf-8", "backslashreplace").decode("utf-8")
            return FleetError(f"the fleet refused ({response.status_code}): {text}")
        return FleetInDoubt(f"unexpected answer from the fleet ({response.status_code})")

    def _state(self, response: httpx.Response) -> str:
        try:
            state = response.json()["state"]
        except (ValueError, KeyError, TypeError):
            state = None
        return _valid_state(state)

    async def spawn(self, vm_id: str, tenant: str, spec: VmSpec) -> str:
        body = {
            "tenant": tenant,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "image": spec.image,
            "name": spec.name,
        }
        response = await self._send("PUT", f"{BASE}/{vm_id}", body)
        if response.status_code in (200, 201):
            return self._state(response)
        raise self._definite_or_doubt(response)

    async def destroy(self, vm_id: str) -> None:
        response = await self._send("DELETE", f"{BASE}/{vm_id}")
        if response.status_code in (200, 204, 404):
            return
        raise self._definite_or_doubt(response)

    async def status(self, vm_id: str) -> str | None:
        response = await self._send("GET", f"{BASE}/{vm_id}")
        if response.status_code == 404:
            return None
        if response.status_code == 200:
            return self._state(response)
        raise self._definite_or_doubt(response)

    async def list(self, tenant: str) -> dict[str, str]:
        response = await self._send("GET", BASE, params={"tenant": tenant})
        if response.status_code != 200:
            raise self._definite_or_doubt(response)
        try:
            vms = response.json()["vms"]
            return {str(vm["id"]): _valid_state(vm["state"]) for vm in vms}
        except (ValueError, KeyError, TypeError):
            raise FleetInDoubt("the fleet's list is not a list of VMs") from None

    async def aclose(self) -> None:
        await self._client.aclose()


def _valid_state(state: object) -> str:
    if state not in ("pending", "running", "error"):
        raise FleetInDoubt("the fleet answered without a valid VM state")
    return str(state)
