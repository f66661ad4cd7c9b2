"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

Generated, never written by hand: the paths from the operations the blueprints declare
(``server/routes/spec.py``), every schema from the msgspec structs that decode the
requests (``server/schemas.py``) and encode the responses (``server/responses.py``, the
core's views), and each problem code's status, headers and members from
``server/problems.py``. So the
document describes exactly what the server accepts and sends.

Problems an operation may answer beyond the ones it names: 401 ``unauthorized`` with a
token, and 403 ``forbidden`` where only one kind of token will do; 400 ``invalid_request``
(an unknown query parameter); 429 ``rate_limited`` where a tenant token is taken (the
tenant's limits); and with a body 400, 413 ``payload_too_large`` and 415
``unsupported_media_type``. A ``text/plain`` answer (a signed note, a key) is described
as a string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from server.problems import CODES, MEMBERS, RETRY_AFTER_503, ProblemBody
from server.routes.spec import Operation, Routes
from server.schemas import REQUEST_ID_RE

REF = "#/components/schemas/"


def _header(schema: dict[str, Any], description: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "schema": schema, "description": description}


#: on every response; the caller's own when it sent a sane one
_REQUEST_ID = _header(
    {"type": "string", "pattern": f"^{REQUEST_ID_RE.pattern}$"}, "the caller's, or a fresh one"
)
#: on every answer to a request that appended audit entries (a success, a refusal that was
#: audited: 403 quota_exceeded, a destroy's 404, the fleet's 502/503), none otherwise
_AUDIT_SEQ = _header(
    {"type": "string", "pattern": "^[0-9]+(, [0-9]+)*$"},
    "the seqs of the audit entries this request appended, in order",
    required=False,
)
#: headers that a problem code always carries (``server/problems.py``)
_PROBLEM_HEADERS: dict[str, dict[str, Any]] = {
    "unauthorized": {"WWW-Authenticate": _header({"const": "Bearer"}, "the scheme to use")},
    # a 429 and every 503 say when to try again
    **{
        code: {"Retry-After": _header({"type": "string", "pattern": "^[0-9]+$"}, "seconds to wait")}
        for code in ("rate_limited", *RETRY_AFTER_503)
    },
}


def problem_codes(op: Operation) -> tuple[str, ...]:
    """Every problem ``op`` may answer (see the module docstring), each once."""
    codes: list[str] = []
    if op.auth != "none":
        codes += ["invalid_request", "unauthorized"]
    if op.auth in ("tenant", "admin"):
        codes.append("forbidden")
    if op.auth in ("tenant", "any"):
        codes.append("rate_limited")
    if op.request is not None:
        codes += ["invalid_request", "payload_too_large", "unsupported_media_type"]
    return tuple(dict.fromkeys([*codes, *op.problems]))


def _problems(codes: Iterable[str]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code in codes:
        status = str(CODES[code][0])
        entry = responses.setdefault(
            status,
            {
                "description": "",
                "headers": {"X-Request-Id": _REQUEST_ID},
                "content": {"application/problem+json": {"schema": {"$ref": REF + "Problem"}}},
            },
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
        entry["headers"].update(_PROBLEM_HEADERS.get(code, {}))
    return responses


def _problem_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The struct's schema, plus which codes carry which extension members (and only they)."""
    rules = []
    for code, members in MEMBERS.items():
        rules.append(
            {
                "if": {"properties": {"code": {"const": code}}, "required": ["code"]},
                "then": {"required": list(members)},
                "else": {"not": {"anyOf": [{"required": [member]} for member in members]}},
            }
        )
    return {**schema, "allOf": rules} if rules else schema


def _success(op: Operation) -> dict[str, Any]:
    headers = {"X-Request-Id": _REQUEST_ID}
    for name, description in op.headers.items():
        # Location is on every such answer; the others only on some (a replay)
        headers[name] = _header({"type": "string"}, description, required=name == "Location")
    response: dict[str, Any] = {"description": op.summary, "headers": headers}
    if op.body is str:
        response["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif op.body is not None:
        schema = {"$ref": REF + op.body.__name__}
        response["content"] = {"application/json": {"schema": schema}}
    if op.links:
        response["links"] = op.links
    return response


def _operation(op: Operation) -> dict[str, Any]:
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "tags": [op.tag],
        "summary": op.summary,
        "responses": {str(op.status): _success(op), **_problems(problem_codes(op))},
    }
    if op.params:
        document["parameters"] = [param.document() for param in op.params]
    if op.request is not None:
        document["requestBody"] = {
            "required": op.request_required,
            "content": {"application/json": {"schema": {"$ref": REF + op.request.__name__}}},
        }
    if op.auth == "none":
        document["security"] = []
    if op.audited:
        for response in document["responses"].values():
            response["headers"]["Audit-Seq"] = _AUDIT_SEQ
    return document


def openapi_document(routes: Iterable[Routes]) -> dict[str, Any]:
    """The document of every operation of ``routes``."""
    operations = [op for group in routes for op in group.operations]
    structs: list[type[msgspec.Struct]] = [ProblemBody]
    for op in operations:
        for struct in (op.body, op.request):
            if struct is not None and struct is not str:
                assert issubclass(struct, msgspec.Struct)
                structs.append(struct)
    _, components = msgspec.json.schema_components(
        list(dict.fromkeys(structs)), ref_template=REF + "{name}"
    )
    components["Problem"] = _problem_schema(components.pop(ProblemBody.__name__))
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, None] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
        tags[op.tag] = None
    return {
        "openapi": "3.1.0",
        "info": {"title": "service-vm-tenant", "version": "1"},
        "tags": [{"name": tag} for tag in tags],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
