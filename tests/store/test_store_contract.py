"""The store boundary's promises (``actors/store/__init__.py``), checked through the interface.

Each test uses only what :class:`~actors.store.Store` offers, plus the pure decisions of
``actors/tenants/decisions.py``. The tests of ``any_store`` run against both stores: the
file store over a real data dir with real fsyncs, and the PostgreSQL store over a real
database. The ones about a write that fails use the file store's fsync (a real
``OSError``); PostgreSQL going away is tested with real replicas (``tests/pg``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio.testing

from actors.errors import AuditUnavailable, NotFound
from actors.journal import fold
from actors.journal.entries import draft
from actors.reply import Reply
from actors.state import IdempotencyRecord, Quota, VmSpec
from actors.store import Store, Ticket
from actors.store.file import FileStoreConfig, open_file_store
from actors.store.postgres.store import PostgresStoreConfig, open_postgres_store
from actors.tenants.decisions import Context, Operate, decide_spawn, outcome_entry
from actors.tenants.protocol import Source, Spawn
from conftest import FlakyFsync
from pgcluster import PgDatabase

USER = Source("127.0.0.1", "tok-user")
ADMIN = {"ip": "127.0.0.1", "token_id": "admin"}


@pytest.fixture(params=["file", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "file":
        async with open_file_store(FileStoreConfig(tmp_path / "data")) as store:
            yield store
        return
    pg: PgDatabase = request.getfixturevalue("pg_db")
    async with open_postgres_store(PostgresStoreConfig(pg.dsn, tmp_path / "data")) as pg_store:
        yield pg_store


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[tuple[Store, FlakyFsync]]:
    async with open_file_store(FileStoreConfig(tmp_path / "data")) as store:
        flaky = FlakyFsync()
        store.writer._fsync = flaky
        yield store, flaky


async def provision(store: Store, tenant: str, quota: Quota) -> None:
    entry = draft("tenant.create", "succeeded", tenant, None, ADMIN, "r",
                  {"quota": quota.to_json(), "token_id": "tok-1"})  # fmt: skip
    await store.record(entry).wait()


def spawn_command(key: str | None = None) -> Spawn:
    return Spawn(VmSpec(1, 256, "debian-12", None), key, "h" if key else None, USER, "r", Reply())


async def decide_spawn_in(
    store: Store, tenant: str, key: str | None = None
) -> tuple[Operate, Ticket]:
    decision, ticket = await store.decide(
        tenant, partial(decide_spawn, cmd=spawn_command(key), ctx=Context()), key=key
    )
    assert isinstance(decision, Operate), decision
    assert ticket is not None
    return decision, ticket


async def test_a_reservation_is_seen_by_the_next_decision_before_it_is_durable(
    any_store: Store,
) -> None:
    store = any_store
    await provision(store, "acme", Quota(8, 8192, 2))
    # No checkpoint between the two decisions: the writer has not run yet.
    _, first = await decide_spawn_in(store, "acme")
    _, second = await decide_spawn_in(store, "acme")
    assert (await store.usage("acme")).allocated.vms == 2
    third, _ = await store.decide("acme", partial(decide_spawn, cmd=spawn_command(), ctx=Context()))
    assert type(third).__name__ == "Refuse", "the quota counts both reservations"
    for ticket in (first, second):
        entry = await ticket.wait()
        assert entry["outcome"] == "requested" and entry["seq"] >= 1


async def test_a_decision_that_never_becomes_durable_leaves_no_trace(
    file_store: tuple[Store, FlakyFsync],
) -> None:
    store, flaky = file_store
    await provision(store, "acme", Quota(8, 8192, 4))
    head = store.head()
    flaky.failing = True
    decision, ticket = await decide_spawn_in(store, "acme", key="k1")
    with pytest.raises(AuditUnavailable):
        await ticket.wait()
    assert (await store.usage("acme")).allocated == Quota(0, 0, 0)
    with pytest.raises(NotFound):
        await store.vm("acme", decision.operation.vm_id)
    assert store.head() == head
    flaky.failing = False
    # the key is free again: the same request decides anew
    again, ticket = await decide_spawn_in(store, "acme", key="k1")
    await ticket.wait()
    assert (await store.vm("acme", again.operation.vm_id)).state == "spawning"


async def test_acknowledged_means_in_the_chain_as_stored(
    any_store: Store,
) -> None:
    store = any_store
    await provision(store, "acme", Quota(8, 8192, 4))
    _, ticket = await decide_spawn_in(store, "acme")
    entry = await ticket.wait()
    seq, head = store.head()
    assert seq >= entry["seq"]
    lines, page_seq, page_head = await store.audit_page(entry["seq"] - 1, 1)
    assert (page_seq, page_head) == (seq, head)
    assert json.loads(lines[0]) == entry


async def test_an_outcome_takes_effect_once_durable_and_not_before(
    file_store: tuple[Store, FlakyFsync],
) -> None:
    store, flaky = file_store
    await provision(store, "acme", Quota(8, 8192, 4))
    decision, ticket = await decide_spawn_in(store, "acme")
    await ticket.wait()
    operation = decision.operation
    succeeded = outcome_entry(operation, True, "running", "", USER, "r")
    flaky.failing = True
    with pytest.raises(AuditUnavailable):
        await store.record(succeeded).wait()
    assert (await store.vm("acme", operation.vm_id)).state == "spawning"
    flaky.failing = False
    pending = store.record(succeeded)
    assert (await store.vm("acme", operation.vm_id)).state == "spawning", "not durable yet"
    await pending.wait()
    assert (await store.vm("acme", operation.vm_id)).state == "running"


async def test_the_directory_follows_durable_entries(
    any_store: Store,
) -> None:
    store = any_store
    await provision(store, "acme", Quota(1, 1, 1))
    assert store.directory.token_valid("acme", "tok-1")
    revoke = draft("token.revoke", "succeeded", "acme", None, ADMIN, "r", {"token_id": "tok-1"})
    ticket = store.record(revoke)
    assert store.directory.token_valid("acme", "tok-1"), "only once it is durable"
    await ticket.wait()
    assert not store.directory.token_valid("acme", "tok-1")


async def test_reads_are_copies_that_cannot_change_the_store(
    any_store: Store,
) -> None:
    store = any_store
    await provision(store, "acme", Quota(8, 8192, 4))
    decision, ticket = await decide_spawn_in(store, "acme")
    await ticket.wait()
    vm = await store.vm("acme", decision.operation.vm_id)
    with pytest.raises(AttributeError):
        vm.state = "running"  # type: ignore[misc]
    usage = await store.usage("acme")
    with pytest.raises(AttributeError):
        usage.quota = Quota(100, 100, 100)  # type: ignore[misc]
    (claimed,) = await store.claim_in_doubt("acme")
    claimed.state = "running"
    assert (await store.vm("acme", vm.id)).state == "spawning"
    page, _ = await store.vms("acme", None, 10)
    assert msgspec.to_builtins(page) == [msgspec.to_builtins(vm)]


async def test_an_unknown_tenant_is_not_found_and_nothing_is_written(
    any_store: Store,
) -> None:
    store = any_store
    head = store.head()
    with pytest.raises(NotFound):
        await decide_spawn_in(store, "nobody")
    with pytest.raises(NotFound):
        await store.usage("nobody")
    await trio.testing.wait_all_tasks_blocked()
    assert store.head() == head


@dataclass(frozen=True)
class Looked:
    """A decision that writes nothing: what the slice held for an idempotency key."""

    record: IdempotencyRecord | None
    entry: None = None


async def test_only_a_tenants_newest_refusal_records_are_kept(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold's bound on quota refusal records (``fold.expire``), kept by both stores as
    each new record is made (the bound made small here: it is read at each decision)."""
    monkeypatch.setattr(fold, "MAX_REFUSALS", 3)
    store = any_store
    await provision(store, "full", Quota(0, 0, 0))
    keys = [f"k{n}" for n in range(5)]
    for key in keys:
        refused, ticket = await store.decide(
            "full", partial(decide_spawn, cmd=spawn_command(key), ctx=Context()), key=key
        )
        assert type(refused).__name__ == "Refuse" and ticket is not None
        await ticket.wait()
    kept = []
    for key in keys:
        looked, _ = await store.decide("full", lambda s, key=key: Looked(s.key(key)), key=key)
        if looked.record is not None:
            assert looked.record.status == 403
            kept.append(key)
    assert kept == keys[-3:]
