"""Tokens and keys against a real ``vm-tenant serve``: the operator's commands, a restart.

Rotation must work on the running server (no downtime): the ``keys`` commands talk to
its admin API while tenants keep using their tokens. Expiry itself is proven in-process
on an injected clock (``test_tokens_keys.py``); here a lifetime is only issued and read.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import trio

from actors.store.file import KEYRING_FILE
from conftest import LiveServer, bearer
from server.keyring import rfc3339


async def run_cli(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    where = ("--url", server.url, "--data-dir", str(server.data_dir))
    return await trio.to_thread.run_sync(partial(server.cli, *args, *where))


async def status(client: httpx.AsyncClient, token: str) -> int:
    return (await client.get("/v1/usage", headers=bearer(token))).status_code


def key_states(listing: str) -> dict[str, str]:
    """``keys list`` output as key id -> state (``signing``, ``active``, ``retired``)."""
    lines = listing.strip().splitlines()
    assert lines[0].split("\t") == ["ID", "CREATED", "STATE"]
    return {line.split("\t")[0]: line.split("\t")[2].split(" ")[0] for line in lines[1:]}


async def test_rotate_retire_and_restart_with_the_operator_commands(
    live_server: LiveServer,
) -> None:
    before = time.time()
    created = await run_cli(
        live_server, "tenant", "create", "acme",
        "--vcpus", "4", "--memory-mib", "4096", "--vms", "2", "--ttl", "3600",
    )  # fmt: skip
    after = time.time()
    assert created.returncode == 0, created.stderr
    old_token = created.stdout.strip()
    expires = re.search(r"expires (\S+)\)", created.stderr)
    assert expires, created.stderr
    assert rfc3339(before + 3600) <= expires.group(1) <= rfc3339(after + 3600)

    listed = await run_cli(live_server, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    ((old_key, state),) = key_states(listed.stdout).items()
    assert state == "signing"

    rotated = await run_cli(live_server, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.strip()
    assert key_states((await run_cli(live_server, "keys", "list")).stdout) == {
        old_key: "active",
        new_key: "signing",
    }

    async with live_server.client() as client:
        assert await status(client, old_token) == 200
        issued = await run_cli(live_server, "token", "issue", "acme", "--ttl", "600")
        assert issued.returncode == 0, issued.stderr
        assert "expires" in issued.stderr
        new_token = issued.stdout.strip()
        assert await status(client, new_token) == 200

        refused = await run_cli(live_server, "keys", "retire", new_key)
        assert refused.returncode != 0
        assert "409" in refused.stderr and "rotate first" in refused.stderr

        retired = await run_cli(live_server, "keys", "retire", old_key)
        assert retired.returncode == 0, retired.stderr
        assert await status(client, old_token) == 401
        assert await status(client, new_token) == 200

        other = await run_cli(
            live_server, "tenant", "create", "beta", "--vcpus", "1", "--memory-mib", "1",
            "--vms", "1",
        )  # fmt: skip
        assert other.returncode == 0, other.stderr

    tenants = await run_cli(live_server, "tenant", "list", "--limit", "1")
    assert tenants.returncode == 0, tenants.stderr
    assert tenants.stdout.splitlines()[1:] == ["acme\t4/4096/2\t0/0/0", "beta\t1/1/1\t0/0/0"]

    assert await trio.to_thread.run_sync(live_server.stop) == 0
    await trio.to_thread.run_sync(live_server.start)
    async with live_server.client() as client:
        assert await status(client, old_token) == 401
        assert await status(client, new_token) == 200
    states = key_states((await run_cli(live_server, "keys", "list")).stdout)
    assert states == {old_key: "retired", new_key: "signing"}


def test_an_unreadable_keyring_stops_the_start(tmp_path: Path) -> None:
    keyring = tmp_path / "data" / "keys" / KEYRING_FILE
    keyring.parent.mkdir(parents=True)
    keyring.write_text('{"version": 1, "keys": []}')
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--bind", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no active key" in result.stderr
    assert "Traceback" not in result.stderr
