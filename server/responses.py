"""JSON success responses, shared by every route module."""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(body), status=status, content_type="application/json", headers=headers
    )
