"""The operator's offline tools on a database: verify its chain, import a data dir into it.

Each opens its own connection (its own asyncio loop inside the Trio run, through
:func:`~actors.store.postgres.bridge.open_database`) and closes it again, so the command
line calls them with ``trio.run`` and never sees asyncio.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from actors.journal.chain import VerifyReport
from actors.store.postgres.bridge import DatabaseSettings, open_database
from actors.store.postgres.importer import ImportReport, import_data_dir
from actors.store.postgres.verify import verify_database


class NoLog(Exception):
    """The database holds no audit log (no vm-tenant schema)."""


async def verify_url(
    dsn: str,
    *,
    expect_head: tuple[int, str] | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> VerifyReport:
    """Verify the chain in the database at ``dsn`` (``StoreUnavailable``: not reachable)."""
    async with open_database(DatabaseSettings(dsn, pool_size=2)) as db:
        if not await db.fetchval("SELECT to_regclass('audit_log') IS NOT NULL"):
            raise NoLog("the database holds no audit log")
        return await verify_database(db, expect_head=expect_head, public_key=public_key)


async def import_url(dsn: str, data_dir: Path) -> ImportReport:
    """Import ``data_dir`` into the empty database at ``dsn`` (``ImportRefused`` if not)."""
    async with open_database(DatabaseSettings(dsn, pool_size=2)) as db:
        return await import_data_dir(db, data_dir)
