"""The metrics listener: a bare ASGI app that serves ``GET /metrics`` and nothing else.

It runs as a second Hypercorn server on the Trio worker, in the same nursery as the API
listener, so it lives and drains with it. The exposition is rendered on the event loop's
thread on purpose: the scrape-time collectors read the actors' state, which only that
thread may touch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from actors.metrics import without_created
from server.problems import problem_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/metrics"


def metrics_app(registry: CollectorRegistry) -> ASGIApp:
    """An ASGI app exposing ``registry`` in the Prometheus text format at ``/metrics``."""
    exposed = without_created(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] != PATH:
            await _problem(send, "not_found", "only /metrics is served here")
        elif scope["method"] != "GET":
            await _problem(send, "method_not_allowed", "/metrics takes GET", [(b"allow", b"GET")])
        else:
            headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
            await _respond(send, 200, headers, generate_latest(exposed))

    return app


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _problem(
    send: Send, code: str, detail: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = problem_body(code, detail)
    headers = [(b"content-type", b"application/problem+json"), *(extra or [])]
    await _respond(send, body.status, headers, msgspec.json.encode(body))


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
