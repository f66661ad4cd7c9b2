"""The audit writer: group commit, chain format on disk, segments, and failed fsyncs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors.errors import AuditUnavailable
from actors.journal.chain import GENESIS
from actors.journal.writer import AuditWriter
from actors.service import open_service
from actors.state import Quota
from actors.tenants.protocol import Source
from conftest import audit_lines, service_config

SOURCE = {"ip": "127.0.0.1", "token_id": "tok-test"}


class CountingFsync:
    """A real fsync that counts its calls and can be told to fail with a real errno."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_with: int | None = None

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        os.fsync(fd)


def submit(writer: AuditWriter, n: int) -> Any:
    return writer.submit(
        op="tenant.update",
        outcome="succeeded",
        tenant="acme",
        vm=None,
        source=SOURCE,
        request_id=f"req-{n}",
        detail={"n": n, "text": "ünïcode ✓"},
    )


def independent_check(lines: list[bytes]) -> None:
    """Re-derive every hash the way API.md describes it, with the standard library."""
    prev = GENESIS
    for seq, line in enumerate(lines, start=1):
        entry = json.loads(line)
        stored = entry.pop("hash")
        body = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert entry["seq"] == seq
        assert entry["prev"] == prev
        assert hashlib.sha256(body.encode()).hexdigest() == stored
        assert entry["ts"].endswith("Z")
        prev = stored


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    path = tmp_path / "audit"
    path.mkdir()
    return path


async def test_group_commit_one_fsync_covers_many_waiters(audit_dir: Path) -> None:
    fsync = CountingFsync()
    writer = AuditWriter(audit_dir, fsync=fsync)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        # 200 entries queued before the writer gets to run: one batch.
        tickets = [submit(writer, n) for n in range(200)]
        entries = [await ticket.wait() for ticket in tickets]
        writer.close()
    assert [e["seq"] for e in entries] == list(range(1, 201))
    # One fsync for the new segment's directory entry, one for the batch.
    assert fsync.calls == 2
    assert writer.stats.fsyncs == 1 and writer.stats.batches == 1
    independent_check(audit_lines(audit_dir.parent))


async def test_single_entries_cost_one_fsync_each(audit_dir: Path) -> None:
    fsync = CountingFsync()
    writer = AuditWriter(audit_dir, fsync=fsync)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for n in range(5):
            await submit(writer, n).wait()
        writer.close()
    assert writer.stats.fsyncs == 5
    assert fsync.calls == 6  # plus the directory, once
    independent_check(audit_lines(audit_dir.parent))


async def test_waiter_answered_only_after_fsync(audit_dir: Path) -> None:
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()
    synced: list[int] = []

    def slow_fsync(fd: int) -> None:
        trio.from_thread.run(release.wait, trio_token=token)
        os.fsync(fd)
        synced.append(fd)

    writer = AuditWriter(audit_dir, fsync=slow_fsync)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        ticket = submit(writer, 1)
        done = trio.Event()

        async def waiter() -> None:
            await ticket.wait()
            done.set()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and not synced
        release.set()
        await done.wait()
        assert synced
        writer.close()


async def test_failed_fsync_fails_the_batch_cuts_it_and_recovers(audit_dir: Path) -> None:
    fsync = CountingFsync()
    writer = AuditWriter(audit_dir, fsync=fsync)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await submit(writer, 1).wait()
        size = sum(p.stat().st_size for p in audit_dir.iterdir())
        fsync.fail_with = errno.EIO
        doomed = [submit(writer, n) for n in (2, 3)]
        for ticket in doomed:
            with pytest.raises(AuditUnavailable):
                await ticket.wait()
        assert not writer.healthy
        assert writer.seq == 1
        fsync.fail_with = None
        entry = await submit(writer, 4).wait()
        writer.close()
    assert entry["seq"] == 2, "the failed batch's seqs are reused: it never happened"
    lines = audit_lines(audit_dir.parent)
    assert len(lines) == 2 and json.loads(lines[1])["detail"]["n"] == 4
    assert sum(p.stat().st_size for p in audit_dir.iterdir()) == size + len(lines[1]) + 1
    assert writer.healthy
    independent_check(lines)


async def test_enospc_on_write_is_not_durable(audit_dir: Path, monkeypatch: Any) -> None:
    writer = AuditWriter(audit_dir)
    real_write = os.write
    failing = {"on": False}

    def write(fd: int, data: Any) -> int:
        if failing["on"]:
            # a short write then a full disk: half a line reaches the file
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await submit(writer, 1).wait()
        failing["on"] = True
        with pytest.raises(AuditUnavailable):
            await submit(writer, 2).wait()
        failing["on"] = False
        await submit(writer, 3).wait()
        writer.close()
    lines = audit_lines(audit_dir.parent)
    assert [json.loads(line)["detail"]["n"] for line in lines] == [1, 3]
    independent_check(lines)


async def test_segments_roll_over_and_form_one_chain(audit_dir: Path) -> None:
    fsync = CountingFsync()
    writer = AuditWriter(audit_dir, fsync=fsync, segment_bytes=2000)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for n in range(30):
            await submit(writer, n).wait()
        writer.close()
    segments = sorted(p.name for p in audit_dir.iterdir())
    assert len(segments) > 3
    lines = audit_lines(audit_dir.parent)
    firsts = [int(name.split(".")[0]) for name in segments]
    assert firsts[0] == 1
    for name, first in zip(segments, firsts, strict=True):
        head = json.loads((audit_dir / name).read_bytes().splitlines()[0])
        assert head["seq"] == first and len(name) == len("000000000001.jsonl")
    # every new segment's directory entry was made durable
    assert fsync.calls == writer.stats.fsyncs + len(segments)
    independent_check(lines)


async def test_damaged_journal_refuses_writes(audit_dir: Path) -> None:
    writer = AuditWriter(audit_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await submit(writer, 1).wait()
        writer.mark_damaged("test")
        with pytest.raises(AuditUnavailable):
            submit(writer, 2)
        assert not writer.healthy
        writer.close()
    assert len(audit_lines(audit_dir.parent)) == 1


USER = {"ip": "127.0.0.1", "token_id": "tok-user"}


# -- through the service ---------------------------------------------------------------------


async def test_unencodable_entry_fails_alone(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        bad = service.audit.submit(
            op="vm.spawn", outcome="failed", tenant="acme", vm="vm-x", source=USER,
            request_id="r", detail={"reason": "bad \ud800 text"},
        )  # fmt: skip
        with pytest.raises(AuditUnavailable):
            await bad.wait()
        await service.registry.create_tenant(
            "acme", Quota(4, 4096, 4), Source("127.0.0.1", "admin"), "r"
        )
        assert service.audit.healthy
    lines = audit_lines(data_dir)
    assert [json.loads(line)["op"] for line in lines] == ["tenant.create"]


async def test_a_full_disk_stays_unhealthy_until_a_probe_finds_room(
    audit_dir: Path, monkeypatch: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """Cutting the file back needs no space, so it must not count as writable again."""
    writer = AuditWriter(audit_dir, inline_io=True)
    real_write = os.write
    disk = {"full": False, "refused": 0}

    def write(fd: int, data: Any) -> int:
        if disk["full"]:
            disk["refused"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await submit(writer, 1).wait()
        size = sum(p.stat().st_size for p in audit_dir.iterdir())
        disk["full"] = True
        with pytest.raises(AuditUnavailable):
            await submit(writer, 2).wait()
        assert not writer.healthy
        with trio.fail_after(60):  # virtual seconds: a guard against a hang only
            for _ in range(5):  # the writer probes every second on its own, and fails
                refused = disk["refused"]
                while disk["refused"] == refused:
                    await trio.sleep(0.1)
                assert not writer.healthy
            disk["full"] = False
            # no write is submitted: a probe finds the room
            while not writer.healthy:
                await trio.sleep(0.1)
        assert sum(p.stat().st_size for p in audit_dir.iterdir()) == size, "probe cut off"
        entry = await submit(writer, 3).wait()
        writer.close()
    assert entry["seq"] == 2
    independent_check(audit_lines(audit_dir.parent))
