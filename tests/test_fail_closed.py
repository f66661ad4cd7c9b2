"""Fail-closed audit through the whole stack: real errnos, nothing forwarded, recovery.

The faults are real ``OSError``s with the errno a failing disk gives (EIO from fsync,
a segment unlinked under the writer), injected at the writer's fsync seam; the files
are real, and so is the check that nothing half-written stays behind.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.journal.checkpoint import read_checkpoints
from actors.service import open_service
from conftest import Api, audit_lines, service_config
from server.app import create_app
from server.auth import Authority


class FlakyFsync:
    """``os.fsync`` that fails with a real errno while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)


@pytest.fixture
async def clocked_api(data_dir: Path) -> AsyncIterator[Api]:
    config = service_config(data_dir, inline_io=True, checkpoint_every=5)
    async with open_service(config) as service:
        app = create_app(service, Authority.for_data_dir(data_dir))
        token = (data_dir / "admin.token").read_text().strip()
        yield Api(app.test_client(), service, token)


async def problem_code(response: object) -> tuple[int, str]:
    body = await response.get_json()  # type: ignore[attr-defined]
    return response.status_code, body["code"]  # type: ignore[attr-defined]


async def test_failed_fsync_answers_503_forwards_nothing_and_recovers_alone(
    autojump_clock: trio.testing.MockClock, clocked_api: Api
) -> None:
    api = clocked_api
    token = await api.create_tenant("acme")
    flaky = FlakyFsync()
    api.service.audit._fsync = flaky
    before = audit_lines(api.service.config.data_dir)

    flaky.failing = True
    assert await problem_code(await api.spawn(token)) == (503, "audit_unavailable")
    assert api.fleet.calls == 0, "nothing may reach the fleet without a durable entry"
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503
    usage = await (await api.client.get("/v1/usage", headers={"Authorization": token})).get_json()
    assert usage["allocated"] == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert audit_lines(api.service.config.data_dir) == before, "no half-written line remains"

    flaky.failing = False
    # no request needed: the writer retries the repair on its own
    with trio.fail_after(30):
        while (await api.client.get("/readyz")).status_code != 200:
            await trio.sleep(0.5)
    response = await api.spawn(token)
    assert response.status_code == 201
    lines = audit_lines(api.service.config.data_dir)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, len(lines) + 1))


async def test_removed_segment_marks_the_journal_damaged(
    autojump_clock: trio.testing.MockClock, clocked_api: Api
) -> None:
    api = clocked_api
    token = await api.create_tenant("acme")
    for segment in (api.service.config.data_dir / "audit").glob("*.jsonl"):
        segment.unlink()
    assert await problem_code(await api.spawn(token)) == (503, "audit_unavailable")
    assert api.fleet.calls == 0
    assert (await api.client.get("/readyz")).status_code == 503
    # damaged is final for this process: later writes are refused too
    assert await problem_code(await api.spawn(token)) == (503, "audit_unavailable")
    assert api.fleet.calls == 0


async def test_checkpoint_at_least_every_n_entries(
    autojump_clock: trio.testing.MockClock, clocked_api: Api
) -> None:
    api = clocked_api
    token = await api.create_tenant("acme")
    for _ in range(4):
        vm = await (await api.spawn(token)).get_json()
        await api.client.delete(f"/v1/vms/{vm['id']}", headers={"Authorization": token})
    # 17 entries, checkpoint_every=5 and a one-hour interval: the count alone triggers
    with trio.fail_after(5):
        while (api.service.checkpoints.latest or {}).get("seq", 0) < 15:
            await trio.sleep(0.01)
    stored = [c for c in read_checkpoints(api.service.config.data_dir) if c is not None]
    seqs = [c["seq"] for c in stored]
    assert seqs == sorted(seqs) and seqs[-1] >= 15
    assert all(b - a <= 2 * 5 for a, b in zip([0, *seqs], seqs, strict=False))
    head = await (await api.client.get("/v1/admin/audit/head", headers=api.admin)).get_json()
    assert head == stored[-1]
