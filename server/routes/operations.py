"""Operations routes, without auth: liveness and readiness."""

from __future__ import annotations

from actors.service import Service
from server.problems import Problem
from server.responses import Status
from server.routes.spec import Operation, Routes


def operations_routes(service: Service) -> Routes:
    """``/healthz`` and ``/readyz``."""
    routes = Routes("operations")

    @routes.operation(
        Operation("GET", "/healthz", "healthz", "operations", "Process up", "none", 200, Status)
    )
    async def healthz() -> Status:
        return Status("ok")

    @routes.operation(
        Operation(
            "GET", "/readyz", "readyz", "operations", "State recovered and audit writable",
            "none", 200, Status, ("audit_unavailable",),
        )
    )  # fmt: skip
    async def readyz() -> Status:
        if not service.ready:
            raise Problem("audit_unavailable", "the audit log is not writable")
        return Status("ready")

    return routes
