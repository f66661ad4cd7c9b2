"""A small reference fleet controller speaking ``docs/fleet-api.md``, for live tests.

Run it as ``python tests/fleet_server.py --bind 127.0.0.1:0 --state FILE``: it serves
the four fleet calls under ``/fleet/v1`` on Quart-Trio over Hypercorn's Trio worker (like
the proxy) and logs one line ``fleet-server listening on http://HOST:PORT`` once it
accepts connections. It is a stand-in for a real fleet, not a production server.

- **Idempotent by VM id.** ``PUT`` of an id it holds creates nothing and answers ``200``
  with that VM; ``DELETE`` or ``GET`` of an id it does not hold answers ``404``.
- **Durable.** Every change is appended to the state file as one JSON line
  (``{"op": "put", "vm": {...}}`` or ``{"op": "delete", "id": ...}``) before it is
  answered; the file is re-read on start (an incomplete last line is ignored), so the
  VMs survive a ``kill -9`` and a restart.
- **Booting.** A VM is ``pending`` for ``boot`` seconds after its creation, then
  ``running``.

Tests steer it over HTTP (these routes are not part of the fleet API):

- ``POST /_knobs`` with a JSON object merges into the fault-injection knobs and answers
  them all (``GET /_knobs`` reads them; ``{"reset": true}`` restores the defaults):

  ``latency``  seconds each fleet call waits before it is handled;
  ``lag``      seconds each fleet call waits after it took effect, before answering;
  ``fail_status``/``fail_count``  answer that status with ``{"error": ...}`` and change
               nothing, for the next ``fail_count`` calls (``null``: every call);
  ``hang``     never answer (until ``hang`` is cleared, then answer normally);
  ``garbage``  answer ``502`` with a body that is not JSON;
  ``effect``   whether a hung or garbled call takes effect first (default: it does not);
  ``boot``     seconds a new VM stays ``pending``.

- ``GET /_stats`` answers ``{"calls": {"PUT", "DELETE", "GET", "LIST"}, "total",
  "in_flight", "hanging", "authorization", "vms"}``: calls seen per method since start,
  calls being handled now, calls hanging now, calls that carried an ``Authorization``
  header (the proxy must never send one), and VMs held.
- ``GET /_vms?tenant=ID`` answers like ``GET /fleet/v1/vms?tenant=ID``, but without the
  knobs and without being counted: the tests' view of what the fleet really holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

log = logging.getLogger("fleet_server")

VM_ID_RE = re.compile(r"vm-[0-9a-f]{32}")
SPEC_FIELDS = {"tenant": str, "vcpus": int, "memory_mib": int, "image": str, "name": str}
Answer = tuple[int, dict[str, Any]]


@dataclass(slots=True)
class Knobs:
    """Fault injection, applied to every call under ``/fleet/v1``."""

    latency: float = 0.0
    lag: float = 0.0
    fail_status: int | None = None
    fail_count: int | None = None
    hang: bool = False
    garbage: bool = False
    effect: bool = False
    boot: float = 0.2


KNOB_TYPES: dict[str, tuple[type, ...]] = {
    "latency": (int, float),
    "lag": (int, float),
    "fail_status": (int, type(None)),
    "fail_count": (int, type(None)),
    "hang": (bool,),
    "garbage": (bool,),
    "effect": (bool,),
    "boot": (int, float),
}


class Fleet:
    """The VMs, their append-only state file, the knobs and the call counters."""

    def __init__(self, state_file: Path, boot: float) -> None:
        self.default_boot = boot
        self.knobs = Knobs(boot=boot)
        self.calls: Counter[str] = Counter()
        self.authorization = 0
        self.in_flight = 0
        self.hanging = 0
        self.unhang = trio.Event()
        self.destroyed: set[str] = set()
        self.vms: dict[str, dict[str, Any]] = self._load(state_file, self.destroyed)
        self._fd = os.open(state_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @staticmethod
    def _load(state_file: Path, destroyed: set[str]) -> dict[str, dict[str, Any]]:
        vms: dict[str, dict[str, Any]] = {}
        if not state_file.exists():
            return vms
        for line in state_file.read_bytes().split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the incomplete last line of a write cut short by kill -9
            if record["op"] == "put":
                vms[record["vm"]["id"]] = record["vm"]
            elif record["op"] == "delete":
                vms.pop(record["id"], None)
                destroyed.add(record["id"])
        return vms

    def _append(self, record: dict[str, Any]) -> None:
        os.write(self._fd, json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def view(self, vm: dict[str, Any]) -> dict[str, Any]:
        """A VM as the fleet API shows it, with its state now."""
        booted = time.time() >= vm["created"] + self.knobs.boot
        shown = {key: vm[key] for key in ("id", "tenant", *SPEC_FIELDS)}
        return {**shown, "state": "running" if booted else "pending"}

    # -- the four calls (each changes the state completely or not at all) --------------------

    def put(self, vm_id: str, body: Any) -> Answer:
        if vm_id in self.vms:
            return 200, self.view(self.vms[vm_id])
        if vm_id in self.destroyed:
            return 409, {"error": "this VM id was destroyed and is never re-created"}
        problem = spec_problem(vm_id, body)
        if problem:
            return 422, {"error": problem}
        vm = {"id": vm_id, **body, "created": time.time()}
        self._append({"op": "put", "vm": vm})
        self.vms[vm_id] = vm
        return 201, self.view(vm)

    def delete(self, vm_id: str) -> Answer:
        if vm_id not in self.vms:
            return 404, {"error": "no such VM"}
        self._append({"op": "delete", "id": vm_id})
        del self.vms[vm_id]
        self.destroyed.add(vm_id)
        return 200, {"id": vm_id, "state": "destroyed"}

    def get(self, vm_id: str) -> Answer:
        vm = self.vms.get(vm_id)
        return (404, {"error": "no such VM"}) if vm is None else (200, self.view(vm))

    def list(self, tenant: str | None) -> Answer:
        if not tenant:
            return 400, {"error": "the tenant query parameter is required"}
        vms = [self.view(vm) for vm_id, vm in sorted(self.vms.items()) if vm["tenant"] == tenant]
        return 200, {"vms": vms}

    # -- fault injection ---------------------------------------------------------------------

    async def call(self, kind: str, operation: Callable[[], Answer]) -> Response:
        """Count the call, apply the knobs around ``operation`` and shape the answer."""
        self.calls[kind] += 1
        if "Authorization" in request.headers:
            self.authorization += 1
        self.in_flight += 1
        try:
            return await self._faulty(operation)
        finally:
            self.in_flight -= 1

    async def _faulty(self, operation: Callable[[], Answer]) -> Response:
        knobs = self.knobs
        await trio.sleep(knobs.latency)
        if knobs.fail_status is not None and knobs.fail_count != 0:
            status = knobs.fail_status
            if knobs.fail_count is not None:
                knobs.fail_count -= 1
            return json_response(status, {"error": f"injected failure ({status})"})
        faulty = knobs.hang or knobs.garbage
        answer = operation() if knobs.effect or not faulty else None
        await trio.sleep(knobs.lag)
        if faulty:
            return await self._fault(answer)
        assert answer is not None
        return json_response(*answer)

    async def _fault(self, answer: Answer | None) -> Response:
        """Garble, or hang until ``hang`` is cleared and then answer what happened."""
        if self.knobs.hang:
            self.hanging += 1
            try:
                await self.unhang.wait()
            finally:
                self.hanging -= 1
            if answer is None:
                return json_response(503, {"error": "released from a hang; nothing changed"})
            return json_response(*answer)
        return Response("<html>502 Bad Gateway</html>", status=502, content_type="text/html")

    def set_knobs(self, body: Any) -> Answer:
        if not isinstance(body, dict):
            return 400, {"error": "expected a JSON object"}
        if body.get("reset") is True:
            body = {k: v for k, v in body.items() if k != "reset"}
            self.knobs = Knobs(boot=self.default_boot)
        for name, value in body.items():
            types = KNOB_TYPES.get(name)
            if types is None:
                return 400, {"error": f"unknown knob {name!r}"}
            wrong_kind = isinstance(value, bool) != (bool in types)
            if wrong_kind or not isinstance(value, types) or (value is not None and value < 0):
                return 400, {"error": f"bad value for {name!r}"}
        for name, value in body.items():
            setattr(self.knobs, name, value)
        if not self.knobs.hang:
            self.unhang.set()
            self.unhang = trio.Event()
        return 200, asdict(self.knobs)

    def stats(self) -> Answer:
        calls = {kind: self.calls[kind] for kind in ("PUT", "DELETE", "GET", "LIST")}
        return 200, {
            "calls": calls,
            "total": sum(calls.values()),
            "in_flight": self.in_flight,
            "hanging": self.hanging,
            "authorization": self.authorization,
            "vms": len(self.vms),
        }


def spec_problem(vm_id: str, body: Any) -> str | None:
    """Why a spawn body (or id) is not acceptable, or None."""
    if not VM_ID_RE.fullmatch(vm_id):
        return "a VM id is 'vm-' followed by 32 lowercase hex digits"
    if not isinstance(body, dict) or set(body) != set(SPEC_FIELDS):
        return f"the body must be an object with exactly {sorted(SPEC_FIELDS)}"
    for name, kind in SPEC_FIELDS.items():
        value = body[name]
        if name == "name" and value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name} must be a {kind.__name__}"
        if kind is int and value < 1:
            return f"{name} must be at least 1"
        if kind is str and not value:
            return f"{name} must not be empty"
    return None


def json_response(status: int, body: Any) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


async def json_body() -> Any:
    try:
        return json.loads(await request.get_data())
    except ValueError:
        return ...


def create_app(fleet: Fleet) -> QuartTrio:
    app = QuartTrio("fleet_server")

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        return json_response(error.code or 500, {"error": error.name})

    @app.put("/fleet/v1/vms/<vm_id>")
    async def put_vm(vm_id: str) -> Response:
        body = await json_body()
        return await fleet.call("PUT", partial(fleet.put, vm_id, body))

    @app.delete("/fleet/v1/vms/<vm_id>")
    async def delete_vm(vm_id: str) -> Response:
        return await fleet.call("DELETE", partial(fleet.delete, vm_id))

    @app.get("/fleet/v1/vms/<vm_id>")
    async def get_vm(vm_id: str) -> Response:
        return await fleet.call("GET", partial(fleet.get, vm_id))

    @app.get("/fleet/v1/vms")
    async def list_vms() -> Response:
        return await fleet.call("LIST", partial(fleet.list, request.args.get("tenant")))

    @app.route("/_knobs", methods=["GET", "POST"])
    async def knobs() -> Response:
        if request.method == "GET":
            return json_response(200, asdict(fleet.knobs))
        return json_response(*fleet.set_knobs(await json_body()))

    @app.get("/_vms")
    async def inspect_vms() -> Response:
        return json_response(*fleet.list(request.args.get("tenant")))

    @app.get("/_stats")
    async def stats() -> Response:
        return json_response(*fleet.stats())

    return app


async def serve(bind: str, state_file: Path, boot: float) -> None:
    """Serve until SIGINT/SIGTERM; hung calls are released on the way out."""
    fleet = Fleet(state_file, boot)
    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("fleet_server.hypercorn")
    config.errorlog.setLevel(logging.WARNING)
    config.graceful_timeout = 2.0
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for _ in signals:
                    fleet.set_knobs({"reset": True})
                    stop.set()
                    return

            nursery.start_soon(watch_signals)
            binds = await nursery.start(
                partial(hypercorn_serve, create_app(fleet), config, shutdown_trigger=stop.wait)
            )
            log.info("fleet-server listening on %s (%d VMs held)", binds[0], len(fleet.vms))
            await stop.wait()
            nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout + 1


# -- for the tests: this server as a subprocess ----------------------------------------------

LISTEN_RE = re.compile(r"fleet-server listening on (http://\S+)")


@dataclass
class FleetServer:
    """This fleet controller as a subprocess (for tests); restarts reuse its port and state file."""

    state: Path
    bind: str = "127.0.0.1:0"
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    log: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> FleetServer:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bind", self.bind, "--state", str(self.state)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            with self.proc.stderr:
                for line in self.proc.stderr:
                    self.log.append(line)
                    match = LISTEN_RE.search(line)
                    if match and not found.is_set():
                        self.url = match.group(1)
                        found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        found.wait(timeout)
        if not self.url:
            self.kill()
            raise RuntimeError("fleet server did not start:\n" + "".join(self.log))
        # Later starts listen where the proxy already looks.
        self.bind = self.url.removeprefix("http://")
        return self

    def kill(self) -> None:
        """``kill -9``: the state file holds whatever was appended before."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)
        self.url = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT (default port 0)")
    parser.add_argument("--state", required=True, type=Path, help="append-only state file")
    parser.add_argument("--boot", type=float, default=0.2, help="seconds a VM stays pending")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    trio.run(serve, args.bind, args.state, args.boot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
