"""Floods of connections against a real server limited to 1,024 open files.

Each test starts ``vm-tenant serve`` with ``RLIMIT_NOFILE`` 1,024 (soft and hard, so it
cannot raise it), snapshots and checkpoints every second, then floods it from twenty
loopback addresses (127.0.0.2-21) while an honest client on 127.0.0.1 keeps asking:

- 1,100 silent peers, each reconnecting as soon as the server lets go of it;
- 1,100 slow bodies (a spawn whose body arrives a byte every half second), likewise;
- a burst of 5,000 connects at once, each asking for ``/healthz``.

Throughout the first two and after, every honest request must be answered 200 (silent
and slow peers make the server wait on them, so they yield their place to a newcomer),
the honest client's writes go on, and the periodic snapshot and checkpoint keep covering
them: the journal still finds descriptors while peers hold the rest. During the burst,
whose connections all ask at once, the honest client may be refused with a 503 like
the burst's own; every connect must get in (the listen backlog holds the burst) and be
answered or closed, none reset; after it, the honest client is served again.
"""

from __future__ import annotations

import json
import resource
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from conftest import UNLIMITED, LiveServer, Provision, bearer
from peers import address

NOFILE = 1024
FLOOD = 1100
BURST = 5000
SOURCES = [f"127.0.0.{n}" for n in range(2, 22)]
HONEST = "127.0.0.1"
SPEC = {"vcpus": 1, "memory_mib": 64, "image": "debian-12"}
GUARD = 120
#: how long a flood peer waits before it connects again (so that the flood measures the
#: server, not how fast this test's own event loop can reconnect)
PAUSE = 0.05


@pytest.fixture(autouse=True)
def enough_descriptors_here() -> None:
    """The test process itself holds every peer's socket: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = BURST + 500
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"these tests need {wanted} open files in the test process (hard {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def limited(tmp_path: Path) -> AsyncIterator[LiveServer]:
    env = {
        **UNLIMITED,
        "VM_TENANT_SNAPSHOT_INTERVAL": "1",
        "VM_TENANT_CHECKPOINT_INTERVAL": "1",
        # Long deadlines: no flood peer is let go by a timeout while the test runs, so
        # the honest client gets in only because peers that keep the server waiting yield.
        "VM_TENANT_KEEP_ALIVE_TIMEOUT": "600",
        "VM_TENANT_HEAD_TIMEOUT": "600",
        "VM_TENANT_BODY_TIMEOUT": "600",
    }
    server = LiveServer(tmp_path / "data", env=env, nofile=NOFILE).start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.kill()


async def open_from(server: LiveServer, source: str) -> trio.SocketStream:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(address(server.url))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class Honest:
    """The honest client: a fresh connection from 127.0.0.1 for every request."""

    def __init__(self, server: LiveServer, token: str) -> None:
        self.server = server
        self.token = token
        self.statuses: Counter[int] = Counter()
        self.spawned: list[str] = []

    def client(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(local_address=HONEST)
        return httpx.AsyncClient(base_url=self.server.url, transport=transport, timeout=30)

    async def ask(self) -> None:
        async with self.client() as client:
            health = await client.get("/healthz")
            self.statuses[health.status_code] += 1
        async with self.client() as client:
            spawn = await client.post("/v1/vms", json=SPEC, headers=bearer(self.token))
            self.statuses[spawn.status_code] += 1
            if spawn.status_code == 201:
                self.spawned.append(spawn.json()["id"])

    async def keep_asking(self, flooding: trio.Event, done: trio.Event) -> None:
        """Ask once the flood is on, and on until ``done``, a round every 0.2 s."""
        await flooding.wait()
        while not done.is_set():
            await self.ask()
            await trio.sleep(0.2)


ROOMY = {"vcpus": 10_000, "memory_mib": 10**6, "vms": 10_000}


async def tenant_token(
    server: LiveServer, provision: Provision, tenant: str, quota: dict[str, int]
) -> str:
    async with server.client() as client:
        return (await provision(client, bearer(server.admin_token), tenant, quota)).token


async def audit_seq(honest: Honest) -> int:
    async with honest.client() as client:
        response = await client.get(
            "/v1/admin/audit", params={"limit": 1}, headers=bearer(honest.server.admin_token)
        )
        assert response.status_code == 200, response.text
        return int(response.json()["head"]["seq"])


async def journal_caught_up(server: LiveServer, seq: int) -> None:
    """Wait until the snapshot and the latest checkpoint both cover ``seq``."""
    data = server.data_dir
    with trio.fail_after(GUARD):
        while True:
            snapshot = json.loads((data / "snapshot" / "state.json").read_bytes())
            checkpoints = (data / "audit-checkpoints.jsonl").read_bytes().splitlines()
            if snapshot["anchor"]["seq"] >= seq and json.loads(checkpoints[-1])["seq"] >= seq:
                return
            await trio.sleep(0.2)


Peer = Callable[[LiveServer, str, trio.Event, Counter[str]], Awaitable[None]]


@asynccontextmanager
async def flood(
    server: LiveServer, peer: Peer, count: int, tally: Counter[str]
) -> AsyncIterator[trio.Event]:
    """``count`` peers running ``peer`` from the flood addresses; yields once all have
    connected once, and stops them on exit."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(peer, server, SOURCES[index % len(SOURCES)], stop, tally)
        with trio.fail_after(GUARD):
            while tally["connected"] < count:
                await trio.sleep(0.05)
        yield stop
        stop.set()
        nursery.cancel_scope.cancel()


async def silent(server: LiveServer, source: str, stop: trio.Event, tally: Counter[str]) -> None:
    """Connect and say nothing; again whenever the server lets go."""
    while not stop.is_set():
        try:
            stream = await open_from(server, source)
        except OSError:
            tally["connect_failed"] += 1
            await trio.sleep(0.05)
            continue
        tally["connected"] += 1
        try:
            answer = await stream.receive_some()
            tally["refused" if answer.startswith(b"HTTP/1.1 503") else "closed"] += 1
        except trio.BrokenResourceError:
            tally["reset"] += 1
        finally:
            await stream.aclose()
        await trio.sleep(PAUSE)


def slow_body(token: str) -> Peer:
    head = (
        b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n".encode()
    )

    async def drip(stream: trio.SocketStream) -> None:
        while True:
            await stream.send_all(b" ")
            await trio.sleep(0.5)

    async def peer(server: LiveServer, source: str, stop: trio.Event, tally: Counter[str]) -> None:
        """Start a spawn and send its body a byte every 0.5 s; again when cut off."""
        while not stop.is_set():
            try:
                stream = await open_from(server, source)
            except OSError:
                tally["connect_failed"] += 1
                await trio.sleep(0.05)
                continue
            tally["connected"] += 1
            try:
                await stream.send_all(head)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drip, stream)
                    answer = await stream.receive_some()
                    nursery.cancel_scope.cancel()
                tally["refused" if answer.startswith(b"HTTP/1.1 503") else "cut"] += 1
            except* trio.BrokenResourceError:
                tally["reset"] += 1
            finally:
                await stream.aclose()
            await trio.sleep(PAUSE)

    return peer


async def assert_served_throughout(
    server: LiveServer, honest_token: str, peer: Peer, count: int
) -> Counter[str]:
    honest = Honest(server, honest_token)
    tally: Counter[str] = Counter()
    done, flooding = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(honest.keep_asking, flooding, done)
        async with flood(server, peer, count, tally):
            flooding.set()
            with trio.fail_after(GUARD):
                while len(honest.spawned) < 5:
                    await trio.sleep(0.1)
            # The journal's upkeep goes on while the peers hold every other descriptor.
            await journal_caught_up(server, await audit_seq(honest))
        done.set()
    await honest.ask()
    assert set(honest.statuses) == {200, 201}, (honest.statuses, tally)
    await journal_caught_up(server, await audit_seq(honest))
    assert server.proc is not None and server.proc.poll() is None
    problems = [line for line in server.log if "failed" in line or "Too many open" in line]
    assert not problems, problems[:5]
    return tally


async def test_1100_silent_peers_leave_room_for_an_honest_client(
    limited: LiveServer, provision: Provision
) -> None:
    honest = await tenant_token(limited, provision, "honest", ROOMY)
    tally = await assert_served_throughout(limited, honest, silent, FLOOD)
    # The silent peers were shed for newcomers, again and again, not just timed out.
    assert tally["closed"] > FLOOD, tally


async def test_1100_slow_bodies_leave_room_for_an_honest_client(
    limited: LiveServer, provision: Provision
) -> None:
    honest = await tenant_token(limited, provision, "honest", ROOMY)
    slow = await tenant_token(limited, provision, "slow", {"vcpus": 1, "memory_mib": 64, "vms": 1})
    tally = await assert_served_throughout(limited, honest, slow_body(slow), FLOOD)
    assert tally["cut"] > FLOOD, tally


async def test_a_5000_connect_burst_is_answered_and_leaves_room(
    limited: LiveServer, provision: Provision
) -> None:
    token = await tenant_token(limited, provision, "honest", ROOMY)
    honest = Honest(limited, token)
    answers: Counter[str] = Counter()

    async def one(source: str) -> None:
        try:
            stream = await open_from(limited, source)
        except OSError as error:
            answers[f"connect: {error}"] += 1
            return
        try:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
            answers[data[:12].decode(errors="replace") or "closed"] += 1
        except trio.BrokenResourceError:
            answers["reset"] += 1
        finally:
            await stream.aclose()

    done = trio.Event()
    flooding = trio.Event()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(honest.keep_asking, flooding, done)
            async with trio.open_nursery() as burst:
                for index in range(BURST):
                    burst.start_soon(one, SOURCES[index % len(SOURCES)])
                flooding.set()
            done.set()
    # Every connect got in (the backlog held the burst) and was answered or closed:
    # served, refused with a 503 while every place was taken by the burst's own
    # connections, or shed for a newcomer while still silent (this one process opens
    # 5,000 connections faster than it gets round to writing on each of them).
    assert set(answers) <= {"HTTP/1.1 200", "HTTP/1.1 503", "closed"}, answers
    assert sum(answers.values()) == BURST
    assert answers["HTTP/1.1 200"] > 0, answers
    assert set(honest.statuses) <= {200, 201, 503}, (honest.statuses, answers)
    after = Honest(limited, token)
    await after.ask()
    assert set(after.statuses) == {200, 201}, after.statuses
    await journal_caught_up(limited, await audit_seq(honest))
