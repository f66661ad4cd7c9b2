"""A ``vm-tenant serve`` that cannot start leaves nothing behind that it did not find.

Each test starts a real server process that must fail (a port in use, a second server on
the same data dir, an unreadable keyring, a damaged log, a full disk) and compares the
directory listing (names, sizes, inode and mtime of each file) before and after: the
data dir, its missing parents, keys, ``admin.token``, temporary files, all must be as
they were. The error is one line on stderr and the exit code 1. ``admin.token`` is only
ever created: a restart leaves the very same file, even on a full disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LISTEN_RE, LiveServer, bearer
from full_disk import FullTmpfs

ROOT = Path(__file__).resolve().parents[2]
QUOTA = {"vcpus": 4, "memory_mib": 4096, "vms": 4}
SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}

Listing = dict[str, tuple[int, int, int]]


def listing(root: Path) -> Listing:
    """Every path under ``root``: (size, inode, mtime in ns); directories (-1, inode, 0)."""
    found: Listing = {}
    for directory, subdirs, files in os.walk(root):
        for name in (*subdirs, *files):
            path = Path(directory) / name
            info = path.lstat()
            # a directory's mtime moves when anything inside is made and removed again
            found[str(path.relative_to(root))] = (
                (info.st_size, info.st_ino, info.st_mtime_ns)
                if name in files
                else (-1, info.st_ino, 0)
            )
    return found


def serve(
    data_dir: Path, *extra: str, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A server that is expected to stop by itself."""
    argv = [
        sys.executable, "-m", "server.cli", "serve", "--data-dir", str(data_dir),
        "--log-format", "json", *extra,
    ]  # fmt: skip
    return subprocess.run(
        [*(prefix or []), *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failed start's message: exit 1, exactly one line, a JSON error event."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    event = json.loads(lines[0])
    assert event["level"] == "error" and "Traceback" not in result.stderr
    return str(event["event"])


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def used_data_dir(tmp_path: Path) -> Path:
    """A data dir a server has run on (a tenant, a VM) and was stopped cleanly."""
    server = LiveServer(tmp_path / "used").start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            admin = bearer(server.admin_token)
            created = client.post(
                "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=admin
            )
            assert created.status_code == 201
            spawned = client.post("/v1/vms", json=SPEC, headers=bearer(created.json()["token"]))
            assert spawned.status_code == 201
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()
    return server.data_dir


# -- nothing left behind -----------------------------------------------------------------------


def test_a_port_in_use_creates_no_data_dir(tmp_path: Path, taken_port: int) -> None:
    data_dir = tmp_path / "not" / "yet" / "data"
    before = listing(tmp_path)
    result = serve(data_dir, "--bind", f"127.0.0.1:{taken_port}")
    assert f"cannot listen on 127.0.0.1:{taken_port}" in one_error_line(result)
    assert listing(tmp_path) == before
    assert not (tmp_path / "not").exists()


def test_a_metrics_port_in_use_creates_no_data_dir(tmp_path: Path, taken_port: int) -> None:
    data_dir = tmp_path / "data"
    before = listing(tmp_path)
    result = serve(data_dir, "--bind", "127.0.0.1:0", "--metrics-bind", f"127.0.0.1:{taken_port}")
    assert f"cannot listen on 127.0.0.1:{taken_port}" in one_error_line(result)
    assert listing(tmp_path) == before


def test_a_port_in_use_leaves_an_existing_data_dir_as_it_was(
    used_data_dir: Path, taken_port: int
) -> None:
    (used_data_dir / "admin.token").unlink()  # a start would create it anew...
    shutil.rmtree(used_data_dir / "snapshot")  # ...and write a snapshot on its way out
    before = listing(used_data_dir)
    result = serve(used_data_dir, "--bind", f"127.0.0.1:{taken_port}")
    assert "cannot listen on" in one_error_line(result)
    assert listing(used_data_dir) == before


def test_an_empty_data_dir_that_was_there_stays(tmp_path: Path, taken_port: int) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = serve(data_dir, "--bind", f"127.0.0.1:{taken_port}")
    assert "cannot listen on" in one_error_line(result)
    assert data_dir.is_dir() and listing(data_dir) == {}


def test_an_unreadable_keyring_leaves_the_data_dir_as_it_was(used_data_dir: Path) -> None:
    keyring = used_data_dir / "keys" / "token-signing.keyring.json"
    keyring.write_text("{not json")
    (used_data_dir / "admin.token").unlink()
    before = listing(used_data_dir)
    result = serve(used_data_dir, "--bind", "127.0.0.1:0")
    assert "unreadable keyring" in one_error_line(result)
    assert listing(used_data_dir) == before


def test_a_damaged_log_leaves_the_data_dir_as_it_was(used_data_dir: Path) -> None:
    shutil.rmtree(used_data_dir / "snapshot")  # so that the damage is in the replayed part
    segment = used_data_dir / "audit" / "000000000001.jsonl"
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"acme"', b'"acne"')
    segment.write_bytes(b"".join(lines))
    (used_data_dir / "admin.token").unlink()
    shutil.rmtree(used_data_dir / "fleet")
    before = listing(used_data_dir)
    result = serve(used_data_dir, "--bind", "127.0.0.1:0")
    assert "tampered" in one_error_line(result)
    assert listing(used_data_dir) == before


def test_a_second_server_on_the_same_data_dir_stops_and_leaves_it_alone(tmp_path: Path) -> None:
    first = LiveServer(tmp_path / "data").start()
    try:
        before = listing(first.data_dir)
        result = serve(first.data_dir, "--bind", "127.0.0.1:0")
        assert "another vm-tenant serve is using it" in one_error_line(result)
        assert listing(first.data_dir) == before
        with httpx.Client(base_url=first.url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
        assert first.stop(signal.SIGTERM) == 0
    finally:
        first.kill()
    # once the first has stopped, the data dir is free again
    second = LiveServer(first.data_dir).start()
    second.kill()


# -- a full disk -------------------------------------------------------------------------------


def test_a_start_on_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    with FullTmpfs(tmp_path / "mnt") as tmpfs:
        tmpfs.fill()
        before = tmpfs.listing()
        result = serve(tmpfs.mountpoint / "data", "--bind", "127.0.0.1:0", prefix=tmpfs.command([]))
        message = one_error_line(result)
        assert "cannot start on" in message and "no space left on device" in message
        assert tmpfs.listing() == before  # no data dir, no keys, no temporary file


def test_admin_token_is_only_ever_created(used_data_dir: Path, tmp_path: Path) -> None:
    token = used_data_dir / "admin.token"
    first = listing(used_data_dir)["admin.token"]
    server = LiveServer(used_data_dir).start()
    try:
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()
    assert listing(used_data_dir)["admin.token"] == first  # same inode, size and mtime

    # On a full disk a restart cannot write anything: it must not need to.
    with FullTmpfs(tmp_path / "mnt") as tmpfs:
        shutil.copytree(used_data_dir, tmpfs.view() / "data")
        tmpfs.fill()
        copied = tmpfs.listing()
        argv = [
            sys.executable, "-m", "server.cli", "serve", "--data-dir",
            str(tmpfs.mountpoint / "data"), "--bind", "127.0.0.1:0", "--log-format", "json",
        ]  # fmt: skip
        proc = subprocess.Popen(tmpfs.command(argv), cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            url = None
            for line in proc.stderr:
                if match := LISTEN_RE.search(line):
                    url = match.group(1)
                    break
            assert url, "the server did not start on a full disk"
            admin = bearer(token.read_text().strip())
            with httpx.Client(base_url=url, timeout=30) as client:
                tenant = client.get("/v1/admin/tenants/acme", headers=admin)
                assert tenant.status_code == 200  # reads are served
        finally:
            proc.kill()
            proc.wait(30)
            if proc.stderr is not None:
                proc.stderr.close()
        after = tmpfs.listing()
        assert after["data/admin.token"] == copied["data/admin.token"]
        assert not [name for name in after if name.endswith(".tmp")]
