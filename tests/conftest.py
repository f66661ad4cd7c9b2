"""Shared fixtures: an in-process core with the Quart test client, and a live server.

``core``/``api`` run the real actors over a real data dir in ``tmp_path`` and drive the
real Quart-Trio app through its test client. ``live_server`` starts ``vm-tenant serve`` as
a subprocess on 127.0.0.1 (port 0) and talks to it over real sockets.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart.typing import TestClientProtocol

from actors.fleet.embedded import EmbeddedFleet
from actors.service import Service, ServiceConfig, open_service
from fleet_server import FleetServer
from pgcluster import pg_cluster, pg_db, pg_own  # noqa: F401  (fixtures)
from server.app import create_app
from server.auth import Authority

QUOTA = {"vcpus": 8, "memory_mib": 8192, "vms": 4}


@dataclass(frozen=True)
class Tenant:
    """A tenant created through the admin API, with its first token."""

    id: str
    token: str
    token_id: str
    #: the whole answer (quota, expires_at, ...)
    body: dict[str, Any]

    @property
    def bearer(self) -> str:
        return f"Bearer {self.token}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": self.bearer}


async def _provision(
    client: Any,
    admin: dict[str, str],
    tenant_id: str,
    quota: dict[str, int] | None = None,
    **extra: Any,
) -> Tenant:
    response = await client.post(
        "/v1/admin/tenants", json={"id": tenant_id, "quota": quota or QUOTA, **extra}, headers=admin
    )
    body = response.json() if isinstance(response, httpx.Response) else await response.get_json()
    assert response.status_code == 201, body
    return Tenant(tenant_id, body["token"], body["token_id"], body)


Provision = Callable[..., Awaitable[Tenant]]


@pytest.fixture
def provision() -> Provision:
    """How every test makes a tenant: ``await provision(client, admin, "acme", quota, **extra)``.

    ``client`` is whatever the test talks through (the in-process test client, or httpx on a
    live server), ``admin`` the operator's ``Authorization`` header; ``quota`` defaults to
    :data:`QUOTA`, ``extra`` are more members of the body (``token_ttl_seconds``).
    ``Api.provision`` is the same, bound to the in-process client.
    """
    return _provision


class FlakyFsync:
    """``os.fsync`` that fails with a real errno (EIO, what a failing disk gives) while
    ``failing`` is set; the audit writer takes it as its fsync."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)


def service_config(data_dir: Path, **overrides: Any) -> ServiceConfig:
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "embedded_boot_seconds": 0.0,
        "fleet_timeout": 5.0,
        "snapshot_interval": 3600.0,
        "checkpoint_interval": 3600.0,
        # no background fleet calls unless a test asks for them (they count as calls)
        "fleet_sync_interval": 3600.0,
    }
    settings.update(overrides)
    return ServiceConfig(**settings)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def core(data_dir: Path) -> AsyncIterator[Service]:
    async with open_service(service_config(data_dir)) as service:
        yield service


@dataclass
class Api:
    """The Quart test client plus the operator's token and a few shortcuts."""

    client: TestClientProtocol
    service: Service
    admin_token: str

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def fleet(self) -> EmbeddedFleet:
        driver = self.service.fleet.driver
        assert isinstance(driver, EmbeddedFleet)
        return driver

    async def provision(
        self, tenant: str, quota: dict[str, int] | None = None, **extra: Any
    ) -> Tenant:
        """The ``provision`` fixture, through this client."""
        return await _provision(self.client, self.admin, tenant, quota, **extra)

    async def spawn(self, token: str, **spec: Any) -> Any:
        body = {"vcpus": 1, "memory_mib": 256, "image": "debian-12", **spec}
        return await self.client.post("/v1/vms", json=body, headers={"Authorization": token})

    async def audit(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        response = await self.client.get(
            f"/v1/admin/audit?after={after}&limit={limit}", headers=self.admin
        )
        assert response.status_code == 200
        return (await response.get_json())["entries"]


@pytest.fixture
async def api(core: Service, data_dir: Path) -> Api:
    authority = Authority.for_store(core.store)  # as `vm-tenant serve` builds it
    app = create_app(core, authority)
    token = (data_dir / "admin.token").read_text().strip()
    return Api(app.test_client(), core, token)


# -- live server ------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


#: the start-up lines, in whichever log format (in JSON the URL ends at the quote)
LISTEN_RE = re.compile(r"vm-tenant listening on (https?://[^\s\"]+)")
METRICS_RE = re.compile(r"vm-tenant metrics on (https?://[^\s\"]+)")


def _limit_files(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


@dataclass
class LiveServer:
    """A ``vm-tenant serve`` subprocess on 127.0.0.1 with an ephemeral port."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    #: RLIMIT_NOFILE (soft and hard) of the server process, if not the test's own
    nofile: int | None = None
    #: what the command line starts with (``FullTmpfs.command([])``: inside its namespace)
    prefix: list[str] = field(default_factory=list)
    #: extra ``vm-tenant serve`` options
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    log: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(init=False)

    def start(self, timeout: float = 30.0) -> LiveServer:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "server.cli", "serve",
             "--data-dir", str(self.data_dir), "--bind", "127.0.0.1:0", *self.args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            preexec_fn=None if self.nofile is None else partial(_limit_files, self.nofile),
        )  # fmt: skip
        found = threading.Event()
        lines = self.log

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            with self.proc.stderr:
                for line in self.proc.stderr:
                    lines.append(line)
                    match = LISTEN_RE.search(line)
                    if match and not found.is_set():
                        self.url = match.group(1)
                        found.set()
            found.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        found.wait(timeout)
        if not self.url:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        return self

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def metrics_url(self) -> str:
        """The ``/metrics`` URL the server announced (it was started with a metrics bind)."""
        for line in self.log:
            if match := METRICS_RE.search(line):
                return match.group(1)
        raise AssertionError("no metrics line:\n" + "".join(self.log))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it to exit; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._pump.join(10)
        self.url = ""
        return code

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)
            self._pump.join(10)
        self.url = ""

    def client(self) -> httpx.AsyncClient:
        """An HTTP client for this server; its timeout only guards against a hang."""
        assert self.url, "the server is not running"
        return httpx.AsyncClient(
            base_url=self.url, timeout=30.0, limits=httpx.Limits(max_connections=128)
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def live_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The server with the default settings, or with the env of an indirect parameter."""
    env: dict[str, str] = getattr(request, "param", {})
    server = LiveServer(tmp_path / "live-data", env=env).start()
    try:
        yield server
    finally:
        server.kill()


#: for tests that storm one tenant on purpose (quota atomicity, durability), not the limits
UNLIMITED = {"VM_TENANT_RATE_LIMIT": "0", "VM_TENANT_MAX_INFLIGHT_SPAWNS": "0"}


def audit_lines(data_dir: Path) -> list[bytes]:
    """Every stored audit line, in chain order, read straight from the segment files."""
    lines: list[bytes] = []
    for segment in sorted((data_dir / "audit").glob("*.jsonl")):
        lines.extend(segment.read_bytes().splitlines())
    return lines


#: the installed ``vm-tenant`` script of this environment
VM_TENANT = Path(sys.executable).with_name("vm-tenant")


def vm_tenant(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``vm-tenant`` with no ``VM_TENANT_*`` env but ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VM_TENANT_")}
    return subprocess.run(
        [str(VM_TENANT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
    )


def pasted_env(server: LiveServer) -> dict[str, str]:
    """What a reader's shell has: no ``VM_TENANT_*`` but the server's URL, ``vm-tenant``
    on the ``PATH``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VM_TENANT_")}
    environ["VM_TENANT_URL"] = server.url
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"
    return environ


def run_pasted(script: str, server: LiveServer, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A documented shell block run as pasted: every line must succeed."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=pasted_env(server),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetServer]:
    """The reference fleet controller (``tests/fleet_server.py``) as a real process."""
    server = FleetServer(tmp_path / "fleet-state.jsonl").start()
    try:
        yield server
    finally:
        server.kill()
