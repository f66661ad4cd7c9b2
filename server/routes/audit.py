"""The audit log's routes: entries as stored, and the latest signed checkpoint (admin token)."""

from __future__ import annotations

import msgspec
from quart import request

from actors.service import Service
from server.problems import Problem
from server.responses import AuditHead, AuditPage, Checkpoint
from server.routes.gates import Gates
from server.routes.spec import LIMIT, Operation, Param, Routes
from server.schemas import parse_int, reject_unknown_params

AFTER = Param("after", "query", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1})


def audit_routes(service: Service, gates: Gates) -> Routes:
    """The audit blueprint over a running core."""
    routes = Routes("audit")
    store = service.store

    @routes.operation(
        Operation(
            "GET", "/v1/admin/audit", "readAudit", "audit", "Read audit entries as stored",
            "admin", 200, AuditPage, params=(AFTER, LIMIT),
        )
    )  # fmt: skip
    async def read_audit() -> AuditPage:
        gates.admin()
        reject_unknown_params(request.args, {"after", "limit"})
        after = parse_int(request.args, "after", 0, 0, 2**63 - 1)
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        lines, seq, head = await store.audit_page(after, limit)
        return AuditPage([msgspec.Raw(line) for line in lines], AuditHead(seq, head))

    @routes.operation(
        Operation(
            "GET", "/v1/admin/audit/head", "auditHead", "audit", "The latest signed checkpoint",
            "admin", 200, Checkpoint, ("not_found",),
        )
    )  # fmt: skip
    async def audit_head() -> Checkpoint:
        gates.admin()
        gates.no_params()
        checkpoint = await store.checkpoint()
        if checkpoint is None:
            raise Problem("not_found", "no checkpoint has been written yet")
        return Checkpoint.of(checkpoint)

    return routes
