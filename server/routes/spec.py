"""Operations: a route and its description, declared once, side by side.

A blueprint module declares each operation with :meth:`Routes.operation`: its method
and path, ``operationId`` and tag, the struct its success answer is (``server/responses.py``
or a view of the core), the problem codes it may answer, its parameters and request
body. The same declaration registers the handler on the blueprint and feeds the OpenAPI
document (``server/openapi.py``), and the handler's answer is encoded as exactly that
struct: a handler that returns anything else fails the request (a bug, logged), so what
is sent is what is described.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
from quart import Blueprint, Response

#: who may call: a tenant token, the admin token, either of them ("any"), or no one needs one
Auth = Literal["tenant", "admin", "any", "none"]
#: what a handler gives back: the body (a struct, a ``str`` for a text/plain answer, or
#: None for 204), optionally with headers
Answer = msgspec.Struct | str | None | tuple[msgspec.Struct | str, dict[str, str]]
#: the media type of a ``str`` answer
TEXT = "text/plain; charset=utf-8"
Handler = Callable[..., Awaitable[Answer]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter: its name in the route (path) and in the document."""

    name: str
    where: Literal["path", "query", "header"]
    schema: dict[str, Any]
    description: str = ""
    #: the route's variable, when it differs from the documented name (path only)
    variable: str | None = None
    #: a query parameter without which the request is a 400 (a path parameter always is)
    required: bool = False

    def document(self) -> dict[str, Any]:
        param: dict[str, Any] = {"name": self.name, "in": self.where, "schema": self.schema}
        param["required"] = self.where == "path" or self.required
        if self.description:
            param["description"] = self.description
        return param


@dataclass(frozen=True, slots=True)
class Operation:
    """One documented operation (see the module docstring)."""

    method: str
    rule: str  # the route, in Quart's syntax (``/v1/vms/<vm_id>``)
    operation_id: str
    tag: str
    summary: str
    auth: Auth
    status: int  # of the success answer
    body: type[msgspec.Struct] | type[str] | None  # its struct; str: text/plain; None: 204
    problems: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    request: type[msgspec.Struct] | None = None
    request_required: bool = True
    #: headers of the success answer: name -> description
    headers: dict[str, str] = field(default_factory=dict)
    #: it appends audit entries: any of its answers may name them in ``Audit-Seq``
    audited: bool = False
    links: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The documented path: route variables as ``{name}`` under their documented names."""
        names = {p.variable or p.name: p.name for p in self.params if p.where == "path"}
        return re.sub(
            r"<(?:[a-z]+:)?(\w+)>", lambda m: "{" + names.get(m[1], m[1]) + "}", self.rule
        )


#: the paging parameters of every list
LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000})
CURSOR = Param("cursor", "query", {"type": "string"}, "the `next` of the previous page")


class Routes:
    """A blueprint whose routes are :class:`Operation`\\ s."""

    def __init__(self, name: str) -> None:
        self.blueprint = Blueprint(name, __name__)
        self.operations: list[Operation] = []

    def operation(self, op: Operation) -> Callable[[H], H]:
        """Register the decorated handler as ``op`` (see the module docstring)."""

        def register(handler: H) -> H:
            encode = msgspec.json.encode
            expected, status = op.body, op.status

            async def view(**kwargs: Any) -> Response:
                answer = await handler(**kwargs)
                headers = None
                if isinstance(answer, tuple):
                    answer, headers = answer
                if expected is None:
                    if answer is not None:
                        raise TypeError(f"{op.operation_id} answers no body")
                    return Response(b"", status=status, headers=headers)
                if expected is str and type(answer) is str:
                    return Response(
                        answer.encode(), status=status, content_type=TEXT, headers=headers
                    )
                if type(answer) is not expected:
                    raise TypeError(
                        f"{op.operation_id} answers {expected.__name__}, not {answer!r}"
                    )
                return Response(
                    encode(answer), status=status, content_type="application/json", headers=headers
                )

            view.__name__ = handler.__name__
            self.blueprint.add_url_rule(op.rule, op.operation_id, view, methods=[op.method])
            self.operations.append(op)
            return handler

        return register
