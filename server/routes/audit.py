"""The audit log's routes: the operator's reads, and the proofs anyone with a token can check.

- ``/v1/admin/audit``, ``/v1/admin/audit/head`` (admin token): entries as stored, and the
  current head signed on demand in both forms (the v1 checkpoint and the C2SP note).
- ``/v1/audit/checkpoint``, ``/key``, ``/proof``, ``/consistency`` (a tenant token or the
  admin token): the Merkle log of API.md v1.1 "Proofs". A tenant gets inclusion proofs
  only for its own entries; any other seq is the very same 404 as one beyond the tree.
- ``/v1/audit`` (tenant token): the caller's own entries, as stored.

Every answer is computed by the store (``actors/store/``), which owns the tree and its key.
"""

from __future__ import annotations

import base64

import msgspec
from quart import request

from actors.service import Service
from server.problems import Problem
from server.responses import AuditHead, AuditPage, Checkpoint, ConsistencyProof, InclusionProof
from server.responses import Trail as TrailPage
from server.routes.gates import Gates
from server.routes.spec import LIMIT, Operation, Param, Routes
from server.schemas import parse_int, reject_unknown_params

MAX_SEQ = 2**63 - 1
AFTER = Param("after", "query", {"type": "integer", "minimum": 0, "maximum": MAX_SEQ})
SEQ = Param("seq", "query", {"type": "integer", "minimum": 1, "maximum": MAX_SEQ}, required=True)
TREE_SIZE = Param(
    "tree_size", "query", {"type": "integer", "minimum": 1, "maximum": MAX_SEQ},
    "the tree to prove inclusion in; default: the current one",
)  # fmt: skip
FROM = Param("from", "query", {"type": "integer", "minimum": 1, "maximum": MAX_SEQ}, required=True)
TO = Param(
    "to", "query", {"type": "integer", "minimum": 1, "maximum": MAX_SEQ},
    "default: the current tree size",
)  # fmt: skip
#: the tree cannot be read right now (behind the log, being indexed): 503, retry
PROOF_PROBLEMS = ("audit_unavailable",)


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def _required(name: str) -> int:
    if name not in request.args:
        raise Problem("invalid_request", f"query parameter `{name}` is required")
    return parse_int(request.args, name, 0, 1, MAX_SEQ)


def _optional(name: str) -> int | None:
    return parse_int(request.args, name, 0, 1, MAX_SEQ) if name in request.args else None


def audit_routes(service: Service, gates: Gates) -> Routes:
    """The audit blueprint over a running core."""
    routes = Routes("audit")
    store = service.store

    # -- the operator's -----------------------------------------------------------------------

    @routes.operation(
        Operation(
            "GET", "/v1/admin/audit", "readAudit", "audit", "Read audit entries as stored",
            "admin", 200, AuditPage, params=(AFTER, LIMIT),
        )
    )  # fmt: skip
    async def read_audit() -> AuditPage:
        gates.admin()
        reject_unknown_params(request.args, {"after", "limit"})
        after = parse_int(request.args, "after", 0, 0, MAX_SEQ)
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        lines, seq, head = await store.audit_page(after, limit)
        return AuditPage([msgspec.Raw(line) for line in lines], AuditHead(seq, head))

    @routes.operation(
        Operation(
            "GET", "/v1/admin/audit/head", "auditHead", "audit",
            "The current head, signed (covers every write acknowledged before the request)",
            "admin", 200, Checkpoint, PROOF_PROBLEMS,
        )
    )  # fmt: skip
    async def audit_head() -> Checkpoint:
        gates.admin()
        gates.no_params()
        head = await store.signed_head()
        return Checkpoint(head.seq, head.hash, head.ts, head.signature, head.note)

    # -- anyone's: the Merkle log -----------------------------------------------------------

    @routes.operation(
        Operation(
            "GET", "/v1/audit/checkpoint", "auditCheckpoint", "proofs",
            "The current tree head as a C2SP signed note (covers every acknowledged write)",
            "any", 200, str, PROOF_PROBLEMS,
        )
    )  # fmt: skip
    async def checkpoint() -> str:
        gates.anyone()
        gates.no_params()
        return (await store.signed_head()).note

    @routes.operation(
        Operation(
            "GET", "/v1/audit/key", "auditKey", "proofs",
            "The log's verifier key (`<origin>+<key ID>+<base64 key>`)", "any", 200, str,
        )
    )  # fmt: skip
    async def key() -> str:
        gates.anyone()
        gates.no_params()
        return str(store.log_key)

    @routes.operation(
        Operation(
            "GET", "/v1/audit/proof", "auditProof", "proofs",
            "The RFC 9162 inclusion proof of an entry (a tenant's own only)", "any", 200,
            InclusionProof, ("not_found", *PROOF_PROBLEMS), params=(SEQ, TREE_SIZE),
        )
    )  # fmt: skip
    async def proof() -> InclusionProof:
        who = gates.anyone()
        reject_unknown_params(request.args, {"seq", "tree_size"})
        seq, tree_size = _required("seq"), _optional("tree_size")
        found = await store.inclusion_proof(seq, tree_size, tenant=who.tenant)
        return InclusionProof(seq, seq - 1, found.tree_size, _b64(found.hashes))

    @routes.operation(
        Operation(
            "GET", "/v1/audit/consistency", "auditConsistency", "proofs",
            "The RFC 9162 consistency proof between two tree sizes", "any", 200,
            ConsistencyProof, PROOF_PROBLEMS, params=(FROM, TO),
        )
    )  # fmt: skip
    async def consistency() -> ConsistencyProof:
        gates.anyone()
        reject_unknown_params(request.args, {"from", "to"})
        old, new = _required("from"), _optional("to")
        found = await store.consistency_proof(old, new)
        return ConsistencyProof(old, found.tree_size, _b64(found.hashes))

    @routes.operation(
        Operation(
            "GET", "/v1/audit", "auditTrail", "proofs",
            "The caller's own audit entries, as stored", "tenant", 200, TrailPage,
            PROOF_PROBLEMS, params=(AFTER, LIMIT),
        )
    )  # fmt: skip
    async def trail() -> TrailPage:
        tenant = gates.tenant()
        reject_unknown_params(request.args, {"after", "limit"})
        after = parse_int(request.args, "after", 0, 0, MAX_SEQ)
        limit = parse_int(request.args, "limit", 100, 1, 1000)
        lines, following = await store.trail(tenant, after, limit)
        return TrailPage([msgspec.Raw(line) for line in lines], following)

    return routes
