"""Logs: a line that cannot be written never changes an answer; one format; what a line says.

The live tests run a real ``vm-tenant serve`` whose stderr is ``/dev/full`` or a file on a
full tmpfs: every answer must be the one a healthy server gives (``/healthz`` included,
spawns answered 201 exactly when carried out), every lost line is counted in
``vm_tenant_log_lines_dropped_total``, and the server stops cleanly. Others read the JSON
lines of a server whose stderr is a pipe: the start-up lines, the misspelt-variable
warning, health probes only at debug level, ``--log-level``, the client ip and the trace
id of a W3C ``traceparent``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import LiveServer, audit_lines, bearer
from full_disk import FullTmpfs
from server.logs import LogSink
from server.observe import trace_id

ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
QUOTA = {"vcpus": 2, "memory_mib": 2048, "vms": 2}
PAGE = os.sysconf("SC_PAGE_SIZE")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dropped(metrics: str) -> float:
    response = httpx.get(metrics, timeout=30)
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "vm_tenant_log_lines_dropped_total":
                return sample.value
    raise AssertionError("no vm_tenant_log_lines_dropped_total in the scrape")


@contextmanager
def blind_server(
    data_dir: Path, prefix: list[str], stderr: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """A server whose stderr is ``stderr`` (a path opened inside ``prefix``'s namespace).

    Its start-up lines cannot be read, so it listens on ports chosen here, and is
    known to be up once ``/healthz`` answers.
    """
    port, mport = free_port(), free_port()
    argv = [
        sys.executable, "-m", "server.cli", "serve", "--data-dir", str(data_dir),
        "--bind", f"127.0.0.1:{port}", "--metrics-bind", f"127.0.0.1:{mport}",
        "--log-format", "json",
    ]  # fmt: skip
    shell = ["sh", "-c", 'file="$1"; shift; exec "$@" 2>>"$file"', "sh", stderr, *argv]
    proc = subprocess.Popen([*prefix, *shell], cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}"
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /healthz"
            time.sleep(0.1)
        yield proc, url, f"http://127.0.0.1:{mport}/metrics"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def exercise(url: str, admin_token: str) -> int:
    """Every kind of answer, each checked; returns how many non-probe requests were made."""
    admin = bearer(admin_token)
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        created = client.post(
            "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=admin
        )
        assert created.status_code == 201, created.text
        token = bearer(created.json()["token"])
        first = client.post("/v1/vms", json=SPEC, headers=token)
        second = client.post("/v1/vms", json=SPEC, headers=token)
        assert first.status_code == second.status_code == 201
        refused = client.post("/v1/vms", json=SPEC, headers=token)
        assert refused.status_code == 403 and refused.json()["dimension"] == "vms"
        bad = client.post("/v1/vms", json={**SPEC, "gpu": 1}, headers=token)
        assert bad.status_code == 400
        listed = client.get("/v1/vms", headers=token)
        assert listed.status_code == 200 and len(listed.json()["vms"]) == 2
        destroyed = client.delete(f"/v1/vms/{first.json()['id']}", headers=token)
        assert destroyed.status_code == 200
        assert client.get("/v1/usage", headers=token).json()["allocated"]["vms"] == 1
        assert client.get("/v1/usage", headers=bearer("nope")).status_code == 401
        assert client.get("/healthz").status_code == 200
    return 9


def check_audit(data_dir: Path) -> None:
    """What the answers said is what the audit log holds: no more, no less."""
    entries = [json.loads(line) for line in audit_lines(data_dir)]
    spawns = [(e["vm"], e["outcome"]) for e in entries if e["op"] == "vm.spawn"]
    assert [outcome for _, outcome in spawns].count("succeeded") == 2
    assert [outcome for _, outcome in spawns].count("rejected") == 1
    destroys = [e["outcome"] for e in entries if e["op"] == "vm.destroy"]
    assert destroys == ["requested", "succeeded"]


def check_stderr_on(
    prefix: list[str], stderr: str, data_dir: Path, fill: Callable[[], None] | None = None
) -> None:
    """A server with stderr on ``stderr`` answers right; ``fill`` makes stderr full once up."""
    admin_file = data_dir / "admin.token"
    with blind_server(data_dir, prefix, stderr) as (proc, url, metrics):
        if fill is None:
            assert dropped(metrics) >= 2  # at least the two start-up lines were lost
        else:
            assert dropped(metrics) == 0
            fill()
        before = dropped(metrics)
        requests = exercise(url, admin_file.read_text().strip())
        # one request line per request lost and counted; health probes wrote none
        assert dropped(metrics) - before == requests
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    check_audit(data_dir)


def test_stderr_on_dev_full_changes_no_answer(tmp_path: Path) -> None:
    check_stderr_on([], "/dev/full", tmp_path / "data")


def test_stderr_on_a_tmpfs_that_fills_up_changes_no_answer(tmp_path: Path) -> None:
    with FullTmpfs(tmp_path / "logs") as tmpfs:
        log = tmpfs.mountpoint / "stderr.log"

        def fill() -> None:
            # The log's last page still has room, which tmpfs does not count as free:
            # blank lines take it, so that the server's next line needs a page too.
            with tmpfs.view(log).open("ab") as f:
                f.write(b"\n" * (-f.tell() % PAGE))
            tmpfs.fill()

        check_stderr_on(tmpfs.command([]), str(log), tmp_path / "data", fill)
        written = (tmpfs.view(log)).read_bytes().decode()
        assert "vm-tenant listening on" in written  # what went out before the disk filled
        # the lines that could not be written: none of them, not even a part
        assert '"event":"request"' not in written


# -- what the lines say ------------------------------------------------------------------------


def lines_of(server: LiveServer) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log]


@pytest.fixture
def json_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    env = {"VM_TENANT_LOG_FORMAT": "json", "VM_TENANT_BNID": "0.0.0.0:1"}
    env.update(getattr(request, "param", {}))
    server = LiveServer(tmp_path / "data", env=env).start()
    try:
        yield server
    finally:
        server.kill()


def test_every_line_has_the_one_format(json_server: LiveServer) -> None:
    with httpx.Client(base_url=json_server.url, timeout=30) as client:
        assert client.get("/openapi.json").status_code == 200
    assert json_server.stop() == 0
    lines = lines_of(json_server)  # each line parses, start-up lines included
    assert all({"timestamp", "level", "logger", "event"} <= line.keys() for line in lines)
    typo = [line for line in lines if "VM_TENANT_BNID" in line["event"]]
    assert [line["level"] for line in typo] == ["warning"]
    assert "did you mean VM_TENANT_BIND" in typo[0]["event"]
    [listening] = [line for line in lines if line["event"].startswith("vm-tenant listening on")]
    assert listening["event"] == f"vm-tenant listening on {json_server_url(json_server)}"
    assert listening["logger"] == "vm_tenant"
    assert lines.index(typo[0]) < lines.index(listening)


def json_server_url(server: LiveServer) -> str:
    text = "".join(server.log)
    start = text.index("vm-tenant listening on ") + len("vm-tenant listening on ")
    return text[start : text.index('"', start)]


def test_request_lines_carry_the_client_ip_and_the_trace_id(json_server: LiveServer) -> None:
    with httpx.Client(base_url=json_server.url, timeout=30) as client:
        sent: dict[str, dict[str, str | bytes]] = {
            "r-trace": {"traceparent": TRACEPARENT},
            "r-none": {},
            "r-bad": {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
            "r-junk": {"traceparent": "\u00e9t\u00e9".encode()},
        }
        for request_id, headers in sent.items():
            answer = client.get("/v1/usage", headers={"X-Request-Id": request_id, **headers})
            assert answer.status_code == 401  # a bad traceparent is never an error
        assert client.get("/healthz", headers={"X-Request-Id": "r-probe"}).status_code == 200
    assert json_server.stop() == 0
    requests = {
        line["request_id"]: line for line in lines_of(json_server) if line["event"] == "request"
    }
    assert requests["r-trace"]["trace_id"] == TRACE
    for request_id in ("r-none", "r-bad", "r-junk"):
        assert requests[request_id]["trace_id"] is None
    assert {line["ip"] for line in requests.values()} == {"127.0.0.1"}
    assert "r-probe" not in requests  # health probes: debug level only


@pytest.mark.parametrize("json_server", [{"VM_TENANT_LOG_LEVEL": "debug"}], indirect=True)
def test_debug_level_shows_health_probes(json_server: LiveServer) -> None:
    with httpx.Client(base_url=json_server.url, timeout=30) as client:
        assert client.get("/healthz", headers={"X-Request-Id": "r-probe"}).status_code == 200
        assert client.get("/readyz", headers={"X-Request-Id": "r-ready"}).status_code == 200
    assert json_server.stop() == 0
    probes = [
        line for line in lines_of(json_server) if line.get("request_id") in ("r-probe", "r-ready")
    ]
    assert [(line["level"], line["route"]) for line in probes] == [
        ("debug", "/healthz"),
        ("debug", "/readyz"),
    ]


@pytest.mark.parametrize("json_server", [{"VM_TENANT_LOG_LEVEL": "warning"}], indirect=True)
def test_warning_level_keeps_only_warnings_and_the_start_up_lines(json_server: LiveServer) -> None:
    with httpx.Client(base_url=json_server.url, timeout=30) as client:
        assert client.get("/openapi.json").status_code == 200
    assert json_server.stop() == 0
    lines = lines_of(json_server)
    events = [line["event"] for line in lines]
    assert any(event.startswith("vm-tenant listening on") for event in events)
    others = [line for line in lines if not line["event"].startswith("vm-tenant listening on")]
    assert others and all(line["level"] in ("warning", "error") for line in others)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, TRACE),
        (f"01-{TRACE}-00f067aa0ba902b7-01-what-later-versions-add", TRACE),
        (f"ff-{TRACE}-00f067aa0ba902b7-01", None),  # version ff is invalid
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),  # 00 has exactly four fields
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE}-00f067aa0ba902b7", None),
        ("", None),
    ],
)
def test_traceparent_parsing(header: str, expected: str | None) -> None:
    assert trace_id([header]) == expected
    assert trace_id([header, header]) is None  # sent twice: ignored


# -- the sink ----------------------------------------------------------------------------------


def test_the_sink_counts_what_it_cannot_write_and_never_runs_lines_together(
    tmp_path: Path,
) -> None:
    with FullTmpfs(tmp_path / "logs") as tmpfs:
        log = tmpfs.view() / "stderr.log"
        log.write_bytes(b"x" * (PAGE - 100) + b"\n")  # 99 bytes left in its page
        tmpfs.fill()
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            sink = LogSink(fd)
            sink.write(b"a" * 300 + b"\n")  # a part goes out, the rest does not fit
            sink.write(b"b" * 300 + b"\n")  # nothing fits
            assert sink.dropped == 2
            (tmpfs.view() / ".fill").unlink()  # room again
            sink.write(b"c" * 10 + b"\n")
            assert sink.dropped == 2
        finally:
            os.close(fd)
        lines = log.read_bytes().split(b"\n")
    assert lines[1] == b"a" * 99  # the part that went out...
    assert lines[2] == b"c" * 10  # ...is ended before the next line
    assert lines[3:] == [b""]
