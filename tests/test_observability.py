"""Metrics and request logs: scraped from the real listener, read from the real stderr.

The live tests start ``vm-tenant serve --metrics-bind 127.0.0.1:0`` with JSON logs, make
requests over real sockets, scrape ``/metrics`` before and after, and parse every stderr
line the server wrote. The in-process tests check what is awkward to provoke from outside
(a failing fsync, the exact audit seqs of a request) through the same app and actors.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.errors import AuditUnavailable
from actors.journal.writer import AuditWriter
from actors.metrics import Metrics
from conftest import Api, LiveServer, bearer
from server.logs import direct_request_logger, formatter, request_logger

SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
SMALL = {"vcpus": 2, "memory_mib": 1024, "vms": 1}
METRICS_RE = re.compile(r"vm-tenant metrics on (http://\S+)")
PLAIN_LINES = re.compile(r"vm-tenant (listening|metrics) on http://\S+\n?")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=30.0) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
def observed_server(tmp_path: Path) -> Any:
    env = {"VM_TENANT_METRICS_BIND": "127.0.0.1:0", "VM_TENANT_LOG_FORMAT": "json"}
    server = LiveServer(tmp_path / "live-data", env=env).start()
    try:
        yield server
    finally:
        server.kill()


def metrics_url(server: LiveServer) -> str:
    for line in server.log:
        if match := METRICS_RE.search(line):
            return match.group(1)
    raise AssertionError("no metrics line:\n" + "".join(server.log))


def json_lines(server: LiveServer) -> list[dict[str, Any]]:
    """Every stderr line but the two announcements, each of which must be a JSON object."""
    lines = []
    for line in server.log:
        if PLAIN_LINES.fullmatch(line):
            continue
        lines.append(json.loads(line))
    return lines


# -- live: metrics -----------------------------------------------------------------------------


async def test_live_metrics_move_with_requests(observed_server: LiveServer) -> None:
    url = metrics_url(observed_server)
    admin = bearer(observed_server.admin_token)
    before = await scrape(url)
    assert value(before, "vm_tenant_tenant_actors", state="active") == 0
    async with observed_server.client() as client:
        for tenant in ("acme", "idle"):
            created = await client.post(
                "/v1/admin/tenants", json={"id": tenant, "quota": SMALL}, headers=admin
            )
            assert created.status_code == 201
            if tenant == "acme":
                token = bearer(created.json()["token"])
        spawned = await client.post("/v1/vms", json=SPEC, headers=token)
        assert spawned.status_code == 201
        refused = await client.post("/v1/vms", json=SPEC, headers=token)
        assert refused.json()["code"] == "quota_exceeded"
        missing = await client.get("/v1/vms/vm-nope", headers=token)
        assert missing.status_code == 404
        assert (await client.get("/no/such/path")).status_code == 404
    after = await scrape(url)

    def grew(name: str, by: float, **labels: str) -> None:
        got = value(after, name, **labels) - value(before, name, **labels)
        assert got == by, (name, labels, got)

    requests = "vm_tenant_http_requests_total"
    grew(requests, 2, method="POST", route="/v1/admin/tenants", status="201")
    grew(requests, 1, method="POST", route="/v1/vms", status="201")
    grew(requests, 1, method="POST", route="/v1/vms", status="403")
    # the route template, never the raw path
    grew(requests, 1, method="GET", route="/v1/vms/<vm_id>", status="404")
    grew(requests, 1, method="GET", route="unmatched", status="404")
    assert not any("vm-nope" in dict(labels).get("route", "") for _, labels in after)
    grew("vm_tenant_http_request_duration_seconds_count", 2, route="/v1/vms")
    grew("vm_tenant_quota_rejections_total", 1, dimension="vms")
    grew("vm_tenant_fleet_calls_total", 1, operation="spawn", result="ok")
    grew("vm_tenant_fleet_call_duration_seconds_count", 1, operation="spawn")
    # create x2, spawn requested + succeeded, the quota rejection
    grew("vm_tenant_audit_batch_size_sum", 5)
    assert value(after, "vm_tenant_audit_fsync_duration_seconds_count") >= 1
    assert value(after, "vm_tenant_audit_head_seq") == 5
    assert value(after, "vm_tenant_audit_healthy") == 1
    assert value(after, "vm_tenant_tenant_actors", state="active") == 1
    assert value(after, "vm_tenant_tenant_actors", state="passivated") == 1
    assert value(after, "vm_tenant_tenant_mailbox_depth", tenant="acme") == 0
    assert value(after, "vm_tenant_vms", state="pending") == 1
    assert value(after, "vm_tenant_vms_in_doubt") == 0
    for name in ("vm_tenant_rate_limited_total", "vm_tenant_audit_io_failures_total"):
        assert value(after, name) == 0


async def test_metrics_listener_serves_only_get_metrics(observed_server: LiveServer) -> None:
    url = metrics_url(observed_server)
    async with httpx.AsyncClient(timeout=30.0) as client:
        other = await client.get(url.replace("/metrics", "/v1/vms"))
        assert other.status_code == 404
        assert other.json()["code"] == "not_found"
        post = await client.post(url, content=b"x")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET"
    # the API listener does not serve metrics
    async with observed_server.client() as client:
        assert (await client.get("/metrics")).status_code == 404


def test_metrics_are_off_by_default(live_server: LiveServer) -> None:
    assert not any("metrics on" in line for line in live_server.log)


@pytest.mark.parametrize(
    "args",
    [
        ["--metrics-bind", "nonsense"],
        ["--metrics-bind", "127.0.0.1:99999"],
        ["--log-format", "xml"],
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert args[0] in result.stderr  # the problem names the setting
    assert "Traceback" not in result.stderr


# -- live: logs --------------------------------------------------------------------------------


async def test_live_request_log_lines(observed_server: LiveServer) -> None:
    admin_token = observed_server.admin_token
    async with observed_server.client() as client:
        created = await client.post(
            "/v1/admin/tenants",
            json={"id": "acme", "quota": SMALL},
            headers={**bearer(admin_token), "X-Request-Id": "req-create"},
        )
        tenant_token = created.json()["token"]
        spawned = await client.post(
            "/v1/vms", json=SPEC, headers={**bearer(tenant_token), "X-Request-Id": "req-spawn"}
        )
        assert spawned.status_code == 201
        listed = await client.get("/v1/vms", headers={**bearer(tenant_token), "X-Request-Id": "r3"})
        assert listed.status_code == 200
        forged = await client.get("/v1/usage", headers={**bearer("x.y"), "X-Request-Id": "r4"})
        assert forged.status_code == 401
    assert observed_server.stop() == 0
    lines = json_lines(observed_server)
    requests = {line["request_id"]: line for line in lines if line["event"] == "request"}

    create = requests["req-create"]
    assert create["tenant"] == "admin"
    assert (create["method"], create["route"], create["status"]) == (
        "POST",
        "/v1/admin/tenants",
        201,
    )
    assert create["audit_seq"] == 1
    assert isinstance(create["latency_ms"], float | int) and create["latency_ms"] >= 0
    spawn = requests["req-spawn"]
    assert spawn["tenant"] == "acme"
    assert spawn["route"] == "/v1/vms"
    # the spawn wrote "requested" then "succeeded"; the line names the outcome's seq
    stored = [
        json.loads(line)
        for segment in sorted((observed_server.data_dir / "audit").glob("*.jsonl"))
        for line in segment.read_text().splitlines()
    ]
    spawn_seqs = [entry["seq"] for entry in stored if entry["request_id"] == "req-spawn"]
    assert spawn["audit_seqs"] == spawn_seqs and len(spawn_seqs) == 2
    assert spawn["audit_seq"] == spawn_seqs[-1]
    assert requests["r3"]["audit_seq"] is None
    assert (requests["r4"]["tenant"], requests["r4"]["status"]) == (None, 401)
    # stdlib logging calls come through the same pipeline
    assert any(line["event"].startswith("received SIGTERM") for line in lines)
    assert all({"timestamp", "level", "logger"} <= line.keys() for line in lines)
    # no secret in any line, in any form
    text = "".join(observed_server.log)
    for secret in (admin_token, tenant_token, tenant_token.split(".")[-1]):
        assert secret not in text
    assert "Authorization" not in text and "Bearer" not in text


async def test_console_log_format(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "d", env={"VM_TENANT_LOG_FORMAT": "console"}).start()
    try:
        async with server.client() as client:
            assert (await client.get("/healthz", headers={"X-Request-Id": "req-h"})).is_success
        assert server.stop() == 0
    finally:
        server.kill()
    line = next(line for line in server.log if "req-h" in line)
    assert not line.startswith("{")
    assert "request" in line and "route=/healthz" in line and "status=200" in line


# -- in process --------------------------------------------------------------------------------


async def test_request_log_carries_the_audit_seq(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vm_tenant.request")
    token = await api.create_tenant("acme", SMALL)
    await api.spawn(token)
    refused = await api.spawn(token)
    assert refused.status_code == 403
    events = [r.msg for r in caplog.records if r.name == "vm_tenant.request"]
    assert all(isinstance(event, dict) for event in events)
    entries = await api.audit()
    rejected = next(e for e in entries if e["outcome"] == "rejected")
    last_spawn = [e for e in events if e["route"] == "/v1/vms"][-1]
    assert last_spawn["status"] == 403
    assert last_spawn["audit_seq"] == rejected["seq"]
    assert last_spawn["request_id"] == rejected["request_id"]


async def test_failed_fsync_and_batches_are_counted(tmp_path: Path) -> None:
    failing = {"on": False}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    metrics = Metrics()
    (tmp_path / "audit").mkdir()
    writer = AuditWriter(tmp_path / "audit", fsync=fsync, metrics=metrics)
    seen: list[list[int]] = []
    writer.observe_durable(lambda entries: seen.append([e["seq"] for e in entries]))

    def submit() -> Any:
        return writer.submit(
            op="tenant.update",
            outcome="succeeded",
            tenant="acme",
            vm=None,
            source={"ip": None, "token_id": "system"},
            request_id="req",
            detail={},
        )

    get = metrics.registry.get_sample_value
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        tickets = [submit() for _ in range(3)]
        for ticket in tickets:
            await ticket.wait()
        failing["on"] = True
        with pytest.raises(AuditUnavailable):
            await submit().wait()
        writer.close()
    assert seen == [[1, 2, 3]]
    assert get("vm_tenant_audit_batch_size_count") == 1
    assert get("vm_tenant_audit_batch_size_sum") == 3
    assert get("vm_tenant_audit_fsync_duration_seconds_count") == 1
    assert get("vm_tenant_audit_io_failures_total", {"op": "fsync"}) == 1
    assert get("vm_tenant_audit_io_failures_total", {"op": "write"}) == 0


def test_a_metrics_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path),
             "--bind", "127.0.0.1:0", "--metrics-bind", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr


async def test_a_429_is_counted_as_rate_limited(api: Api) -> None:
    token = await api.create_tenant("acme")
    api.service.registry.close()  # the tenant's actor was never started: it now answers busy
    spec = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
    response = await api.client.post("/v1/vms", json=spec, headers={"Authorization": token})
    assert response.status_code == 429
    get = api.service.metrics.registry.get_sample_value
    assert get("vm_tenant_rate_limited_total", {"reason": "busy"}) == 1


async def test_a_shared_request_id_does_not_mix_callers_seqs(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vm_tenant.request")
    tokens = {tenant: await api.create_tenant(tenant) for tenant in ("acme", "umbrella")}

    async def spawn(tenant: str) -> None:
        headers = {"Authorization": tokens[tenant], "X-Request-Id": "same-id"}
        response = await api.client.post("/v1/vms", json=SPEC, headers=headers)
        assert response.status_code == 201

    async with trio.open_nursery() as nursery:
        for tenant in tokens:
            nursery.start_soon(spawn, tenant)
    owner = {e["seq"]: e["tenant"] for e in await api.audit() if e["request_id"] == "same-id"}
    assert len(owner) == 4
    lines = [r.msg for r in caplog.records if r.name == "vm_tenant.request"]
    spawns = [line for line in lines if line["request_id"] == "same-id"]
    assert sorted(line["tenant"] for line in spawns) == ["acme", "umbrella"]
    for line in spawns:
        assert len(line["audit_seqs"]) == 2
        assert {owner[seq] for seq in line["audit_seqs"]} == {line["tenant"]}


def test_json_lines_mask_secret_keys_and_render_stdlib_records() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json", stream))
    plain = logging.getLogger("vm_tenant.test.plain")
    structured = logging.getLogger("vm_tenant.test.request")
    for logger in (plain, structured):
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        request_logger("vm_tenant.test.request").info("request", token="s3cret", status=200)
        plain.warning("disk %s is slow", "sda")
    finally:
        for logger in (plain, structured):
            logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["token"] == "[redacted]" and first["status"] == 200
    assert "s3cret" not in stream.getvalue()
    assert (second["event"], second["level"], second["logger"]) == (
        "disk sda is slow",
        "warning",
        "vm_tenant.test.plain",
    )


def test_the_direct_request_log_writes_the_same_json_lines_as_the_stdlib_pipeline() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8")
    direct_request_logger("json", stream).info("request", token="s3cret", status=200)
    via_stdlib = io.StringIO()
    handler = logging.StreamHandler(via_stdlib)
    handler.setFormatter(formatter("json", via_stdlib))
    logger = logging.getLogger("vm_tenant.test.same")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        request_logger("vm_tenant.test.same").info("request", token="s3cret", status=200)
    finally:
        logger.removeHandler(handler)
    direct = json.loads(raw.getvalue().decode().replace("vm_tenant.request", "vm_tenant.test.same"))
    stdlib = json.loads(via_stdlib.getvalue())
    assert direct.keys() == stdlib.keys()
    assert {k: v for k, v in direct.items() if k != "timestamp"} == {
        k: v for k, v in stdlib.items() if k != "timestamp"
    }
    assert direct["token"] == "[redacted]" and b"s3cret" not in raw.getvalue()
