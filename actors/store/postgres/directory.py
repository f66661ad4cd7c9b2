"""The token directory of a replica: a cache of the ``tokens`` table, kept within a second.

The edge checks a token on every request without awaiting, so each replica keeps the
valid token ids of every tenant in memory (a :class:`~actors.state.Directory`). Every
transaction that changes a tenant's tokens (a tenant created or deleted, a token issued or
revoked) inserts a ``directory_changes`` row naming the tenant and sends
``NOTIFY vm_tenant_directory`` in the same transaction (:func:`note_change`).
:class:`DirectoryFollower` re-reads the tokens of the tenants named after the last change
it saw, on every notification and at the latest every ``poll`` seconds, so a revocation or
a deletion reaches every replica within ``poll`` plus one query (under a second), usually
within milliseconds. After it lost the database it reads the whole table again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import asyncpg
import trio

from actors.state import Directory
from actors.store.postgres.bridge import Database, Direct, Queries, StoreUnavailable

log = logging.getLogger("vm_tenant.store.directory")

CHANNEL = "vm_tenant_directory"
#: changes older than this are pruned (a replica that lags more reloads everything)
KEEP_CHANGES = "1 hour"
#: read again at every refresh: longer than a transaction may take to commit
RECENT = "30 seconds"


async def note_change(con: Queries, tenant_id: str) -> None:
    """Record, in the caller's transaction, that ``tenant_id``'s tokens changed."""
    await con.execute("INSERT INTO directory_changes (tenant) VALUES ($1)", tenant_id)
    await con.execute("SELECT pg_notify($1, $2)", CHANNEL, tenant_id)


async def _everything(con: Direct) -> tuple[int, list[asyncpg.Record]]:
    """The last change's version and every tenant's tokens, in one snapshot."""
    seen = await con.fetchval("SELECT coalesce(max(version), 0) FROM directory_changes")
    rows = await con.fetch(
        "SELECT t.id, array_remove(array_agg(k.token_id), NULL) AS tokens "
        "FROM tenants t LEFT JOIN tokens k ON k.tenant = t.id GROUP BY t.id"
    )
    return seen, rows


class DirectoryFollower:
    """Keeps ``directory`` in step with the database (see the module docstring)."""

    def __init__(self, db: Database, *, poll: float = 0.5) -> None:
        self.directory = Directory()
        self._db = db
        self._poll = poll
        self._seen = -1  # the last directory_changes version applied; -1: load everything

    async def load(self) -> None:
        """Read every tenant's tokens (at start, and after the database was away)."""
        seen, rows = await self._db.atomic(_everything, "repeatable_read")
        present = {row["id"]: set(row["tokens"]) for row in rows}
        directory = self.directory
        for tenant_id in [t for t in directory.tenant_ids() if t not in present]:
            directory.remove_tenant(tenant_id)
        for tenant_id, tokens in present.items():
            directory.add_tenant(tenant_id, tokens)
        self._seen = seen

    async def refresh(self, tenants: Iterable[str] = ()) -> None:
        """Apply the changes after the last one seen (and re-read ``tenants`` anyway)."""
        if self._seen < 0:
            await self.load()
            return
        # Versions are taken when a change is made, not when it commits: a change may
        # commit after one with a higher version was seen. So the changes of the last
        # RECENT seconds (longer than any transaction may last) are read again too.
        changes = await self._db.fetch(
            "SELECT version, tenant FROM directory_changes WHERE version > $1 "
            f"OR changed_at > now() - interval '{RECENT}' ORDER BY version",
            self._seen,
        )
        named = set(tenants) | {row["tenant"] for row in changes}
        if named:
            await self.reread(named)
        if changes:
            self._seen = max(self._seen, changes[-1]["version"])

    async def reread(self, tenants: Iterable[str]) -> None:
        """Read the tokens of ``tenants`` again (a tenant without a row is gone)."""
        named = sorted(set(tenants))
        rows = await self._db.fetch(
            "SELECT t.id, array_remove(array_agg(k.token_id), NULL) AS tokens "
            "FROM tenants t LEFT JOIN tokens k ON k.tenant = t.id "
            "WHERE t.id = ANY($1::text[]) GROUP BY t.id",
            named,
        )
        present = {row["id"]: set(row["tokens"]) for row in rows}
        for tenant_id in named:
            if tenant_id in present:
                self.directory.add_tenant(tenant_id, present[tenant_id])
            else:
                self.directory.remove_tenant(tenant_id)

    async def run(self) -> None:
        """Follow the changes until cancelled; reload everything after an outage."""
        while True:
            try:
                async with self._db.listen(CHANNEL) as notifications:
                    # anything may have changed while nobody listened
                    await self.load()
                    while True:
                        named: set[str] = set()
                        with trio.move_on_after(self._poll):
                            latest = await notifications.wait()
                            named = {latest[CHANNEL]} if CHANNEL in latest else set()
                        await self.refresh(named)
            except StoreUnavailable as error:
                log.warning("directory lost the database (%s); retrying", error)
                self._seen = -1
                await trio.sleep(self._poll)

    async def prune(self) -> None:
        await self._db.execute(
            f"DELETE FROM directory_changes WHERE changed_at < now() - interval '{KEEP_CHANGES}'"
        )
