"""Metrics that tell the truth: scraped from a real server, checked against exact values.

429s by reason (the request rate, the spawn slots, a full mailbox, shutting down), the
process collector against ``/proc`` of the server process, the build's version, the
fleet breaker, the last checkpoint and snapshot against the files they wrote, and no
``_created`` series. The reasons that a live server cannot be driven into on demand (a
full mailbox, spawn slots held by a fleet that hangs) are provoked in process, through
the same app and actors.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from actors.errors import BUSY_REASONS, Busy
from actors.service import open_service
from actors.state import Quota
from actors.tenants.protocol import Source, UpdateQuota
from conftest import Api, LiveServer, bearer, service_config
from server.app import create_app
from server.auth import Authority

SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
QUOTA = {"vcpus": 8, "memory_mib": 8192, "vms": 8}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(url: str) -> str:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    return response.text


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    return parse(scrape_text(url))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def server_pid(server: LiveServer) -> int:
    assert server.proc is not None
    return server.proc.pid


@pytest.fixture
def metered(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    env = {
        "VM_TENANT_METRICS_BIND": "127.0.0.1:0",
        "VM_TENANT_LOG_FORMAT": "json",
        **getattr(request, "param", {}),
    }
    server = LiveServer(tmp_path / "data", env=env).start()
    try:
        yield server
    finally:
        server.kill()


def tenant_token(
    server: LiveServer, client: httpx.Client, quota: dict[str, int] = QUOTA
) -> dict[str, str]:
    created = client.post(
        "/v1/admin/tenants",
        json={"id": "acme", "quota": quota},
        headers=bearer(server.admin_token),
    )
    assert created.status_code == 201, created.text
    return bearer(created.json()["token"])


# -- live ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metered", [{"VM_TENANT_RATE_LIMIT": "0.001", "VM_TENANT_RATE_BURST": "3"}], indirect=True
)
def test_a_rate_limit_refusal_is_counted_as_such(metered: LiveServer) -> None:
    url = metered.metrics_url
    before = scrape(url)
    for reason in BUSY_REASONS:  # every reason is there from the start, at zero
        assert value(before, "vm_tenant_rate_limited_total", reason=reason) == 0
    with httpx.Client(base_url=metered.url, timeout=30) as client:
        token = tenant_token(metered, client)
        # a bucket of 3 that refills once in 1000 s: exactly 3 pass, then 429s
        answers = [client.get("/v1/usage", headers=token).status_code for _ in range(5)]
    assert answers == [200, 200, 200, 429, 429]
    after = scrape(url)
    assert value(after, "vm_tenant_rate_limited_total", reason="rate_limit") == 2
    for reason in ("spawn_slots", "mailbox_full", "shutting_down"):
        assert value(after, "vm_tenant_rate_limited_total", reason=reason) == 0


def test_process_build_and_no_created_series(metered: LiveServer) -> None:
    url = metered.metrics_url
    pid = server_pid(metered)
    text = scrape_text(url)
    assert "_created" not in text
    samples = parse(text)
    assert value(samples, "vm_tenant_build_info", version=version("service-vm-tenant")) == 1

    # The start time, as the kernel keeps it: clock ticks after boot.
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    started = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    assert value(samples, "process_start_time_seconds") == pytest.approx(started, abs=0.01)
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    soft = next(line.split()[3] for line in limits if line.startswith("Max open files"))
    assert value(samples, "process_max_fds") == int(soft)
    assert value(samples, "process_resident_memory_bytes") > 10 * 1024 * 1024

    # Five more connections, each answered once so it has surely been accepted: five
    # more descriptors in the server. The scrapes share one kept-alive connection, so
    # that no scrape's own connection comes or goes in between.
    host, port = metered.url.removeprefix("http://").rsplit(":", 1)
    sockets = []
    with httpx.Client(timeout=30) as scraper:
        before = parse(scraper.get(url).text)
        try:
            for _ in range(5):
                sock = socket.create_connection((host, int(port)), timeout=30)
                sockets.append(sock)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            held = parse(scraper.get(url).text)
        finally:
            for sock in sockets:
                sock.close()
    assert value(held, "process_open_fds") - value(before, "process_open_fds") == 5

    # CPU as the kernel counts it (user + system ticks), read around a scrape; compared
    # in whole ticks, since the collector's sum of two divided tick counts is not exact
    ticks_per_second = os.sysconf("SC_CLK_TCK")

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])

    low = cpu_ticks()
    scraped = value(scrape(url), "process_cpu_seconds_total")
    assert low <= round(scraped * ticks_per_second) <= cpu_ticks()


@pytest.mark.parametrize(
    "metered",
    [{"VM_TENANT_CHECKPOINT_INTERVAL": "0.2", "VM_TENANT_SNAPSHOT_INTERVAL": "0.5"}],
    indirect=True,
)
def test_last_checkpoint_and_snapshot(metered: LiveServer) -> None:
    url = metered.metrics_url
    fresh = scrape(url)
    assert value(fresh, "vm_tenant_last_checkpoint_seq") == 0
    assert ("vm_tenant_last_checkpoint_age_seconds", frozenset()) not in fresh
    with httpx.Client(base_url=metered.url, timeout=30) as client:
        token = tenant_token(metered, client)
        assert client.post("/v1/vms", json=SPEC, headers=token).status_code == 201
    data_dir = metered.data_dir
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing assertion
    while True:
        samples = scrape(url)
        head = value(samples, "vm_tenant_audit_head_seq")
        done = (
            value(samples, "vm_tenant_last_checkpoint_seq") == head
            and value(samples, "vm_tenant_last_snapshot_seq") == head
        )
        if done:
            break
        assert time.monotonic() < deadline, "no checkpoint and snapshot of the head"
        time.sleep(0.1)
    assert head == 3  # tenant.create, vm.spawn requested and succeeded

    checkpoint = json.loads((data_dir / "audit-checkpoints.jsonl").read_text().splitlines()[-1])
    snapshot = data_dir / "snapshot" / "state.json"
    assert checkpoint["seq"] == json.loads(snapshot.read_text())["anchor"]["seq"] == head
    signed_at = datetime.fromisoformat(checkpoint["ts"]).timestamp()
    written_at = snapshot.stat().st_mtime
    low = time.time()
    samples = scrape(url)
    high = time.time()
    checkpoint_age = value(samples, "vm_tenant_last_checkpoint_age_seconds")
    snapshot_age = value(samples, "vm_tenant_last_snapshot_age_seconds")
    assert low - signed_at <= checkpoint_age <= high - signed_at
    assert low - written_at <= snapshot_age <= high - written_at


def test_the_fleet_breaker_opens_after_five_failures(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        fleet = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {"VM_TENANT_METRICS_BIND": "127.0.0.1:0", "VM_TENANT_FLEET": fleet}
    server = LiveServer(tmp_path / "data", env=env).start()
    try:
        url = server.metrics_url
        closed = scrape(url)
        assert value(closed, "vm_tenant_fleet_breaker_state", state="closed") == 1
        assert value(closed, "vm_tenant_fleet_breaker_state", state="open") == 0
        with httpx.Client(base_url=server.url, timeout=30) as client:
            token = tenant_token(server, client)
            for _ in range(5):
                assert client.post("/v1/vms", json=SPEC, headers=token).status_code == 503
        opened = scrape(url)
        assert value(opened, "vm_tenant_fleet_breaker_state", state="open") == 1
        assert value(opened, "vm_tenant_fleet_breaker_state", state="closed") == 0
        assert value(opened, "vm_tenant_fleet_consecutive_failures") == 5
    finally:
        server.kill()


# -- in process --------------------------------------------------------------------------------


async def test_spawn_slots_and_shutting_down_are_told_apart(
    autojump_clock: trio.testing.MockClock, data_dir: Path
) -> None:
    config = service_config(data_dir, inline_io=True, max_inflight_spawns=1)
    async with open_service(config) as service:
        app = create_app(service, Authority.for_store(service.store))
        api = Api(app.test_client(), service, (data_dir / "admin.token").read_text().strip())
        token = (await api.provision("acme")).bearer
        api.fleet.knobs.hang = True  # the first spawn holds the tenant's only slot
        get = service.metrics.registry.get_sample_value
        async with trio.open_nursery() as nursery:
            nursery.start_soon(api.spawn, token)
            await trio.testing.wait_all_tasks_blocked()
            refused = await api.spawn(token)
            assert refused.status_code == 429
            assert get("vm_tenant_rate_limited_total", {"reason": "spawn_slots"}) == 1
        service.registry.close()
        api.fleet.knobs.hang = False
        stopping = await api.spawn(token)
        assert stopping.status_code == 429
        assert get("vm_tenant_rate_limited_total", {"reason": "shutting_down"}) == 1
        assert get("vm_tenant_rate_limited_total", {"reason": "spawn_slots"}) == 1


async def test_a_full_mailbox_is_its_own_reason(api: Api) -> None:
    """Mailbox-full is the one 429 a request cannot be steered into from outside: the
    actor drains its mailbox between any two awaits of a request. Calls started in one
    go all reach the mailbox before the actor takes its first command."""
    await api.provision("acme")
    registry = api.service.registry
    quota, source = Quota(1, 1, 1), Source("127.0.0.1", "admin")
    refusals: list[Busy] = []

    async def change_quota() -> None:
        try:
            await registry.call("acme", lambda reply: UpdateQuota(quota, source, "r", reply))
        except Busy as error:
            refusals.append(error)

    mailbox = api.service.config.mailbox_size
    assert not registry.is_active("acme")  # its actor starts with the first call
    async with trio.open_nursery() as nursery:
        for _ in range(mailbox + 10):
            nursery.start_soon(change_quota)
    # the first ``mailbox`` commands fill the new actor's mailbox; the rest find it full
    assert len(refusals) == 10
    assert {error.reason for error in refusals} == {"mailbox_full"}
