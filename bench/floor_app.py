"""The floor for benchmarks: a bare Quart-Trio app with the proxy's routes and body sizes.

No auth, no actors, no audit: it answers what the proxy would answer, from memory, so
that ``proxy / floor`` measures what the proxy's own work costs on top of Quart-Trio and
Hypercorn. Run it with ``hypercorn --worker-class trio bench.floor_app:app``.
"""

from __future__ import annotations

import secrets

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

app = QuartTrio("floor")
VM = {
    "id": "",
    "tenant": "bench",
    "state": "pending",
    "vcpus": 1,
    "memory_mib": 256,
    "image": "debian-12",
    "name": None,
    "created_at": "2026-11-27T00:00:00.000000Z",
}


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status=status, content_type="application/json")


@app.post("/v1/vms")
async def spawn() -> Response:
    await request.get_data()
    return _json({**VM, "id": f"vm-{secrets.token_hex(16)}"}, 201)


@app.get("/v1/vms/<vm_id>")
async def status(vm_id: str) -> Response:
    return _json({**VM, "id": vm_id, "state": "running"})


@app.delete("/v1/vms/<vm_id>")
async def destroy(vm_id: str) -> Response:
    return _json({"id": vm_id, "state": "destroyed"})
