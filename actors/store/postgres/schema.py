"""The schema's version and its migrations.

The database records which versions it has in ``schema_version`` (one row per version
applied). :func:`migrate` brings it to the newest version this build knows, inside one
transaction that first takes a transaction-level advisory lock: replicas starting at the
same moment queue on the lock, the first applies what is missing, the others then find
nothing to do. A failed migration rolls back whole; the lock goes with the transaction.

Adding version N: write ``migrations/mNNNN_<what>.py`` with ``DESCRIPTION`` and ``SQL``
(and, when SQL alone cannot do it, ``async def apply(con)``, run after the SQL). Never
edit a version that has shipped. A replica of the new build migrates the database at its
start; replicas of the old build refuse to start on it (:class:`SchemaTooNew`), so roll
out by stopping the old replicas, or write versions that old code can live with and say
so in their description.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from actors.store.postgres import migrations
from actors.store.postgres.bridge import Connection, Database


def advisory_key(name: str) -> int:
    """A stable 64-bit advisory-lock key for ``name`` (signed, as PostgreSQL takes it)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


MIGRATION_LOCK = advisory_key("vm-tenant.schema.migrate")


class SchemaError(Exception):
    """The database cannot be used by this build; the message says why."""


class SchemaTooNew(SchemaError):
    """The database has versions this build does not know (a newer build migrated it)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str
    apply: Callable[[Connection], Awaitable[None]] | None = None


def known_migrations() -> list[Migration]:
    """Every migration of this build, by version; versions run 1, 2, ... without gaps."""
    found: list[Migration] = []
    for info in pkgutil.iter_modules(migrations.__path__):
        if not (info.name.startswith("m") and info.name[1:5].isdigit()):
            continue
        module = importlib.import_module(f"{migrations.__name__}.{info.name}")
        found.append(
            Migration(
                int(info.name[1:5]), module.DESCRIPTION, module.SQL, getattr(module, "apply", None)
            )
        )
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise SchemaError(f"migration versions are not 1..n: {[m.version for m in found]}")
    return found


LATEST = len(known_migrations())


async def current_version(con: Connection) -> int:
    """The newest version applied; 0 for an empty database."""
    if not await con.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
        return 0
    return int(await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))


async def migrate(db: Database) -> int:
    """Bring the schema to :data:`LATEST` (safe to run from many replicas at once).

    Returns the version the database had before. Raises :class:`SchemaTooNew` when it is
    ahead of this build, and :class:`SchemaError` when it holds tables of something else.
    """
    async with db.transaction() as con:
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        before = await current_version(con)
        if before > LATEST:
            raise SchemaTooNew(
                f"the database has schema version {before}; this build knows up to {LATEST}"
            )
        if before == 0:
            foreign = await con.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            )
            if foreign:
                raise SchemaError(
                    "the database holds tables but no vm-tenant schema: use an empty database"
                )
            await con.execute(
                """
                CREATE TABLE schema_version (
                    version     integer PRIMARY KEY,
                    description text NOT NULL,
                    applied_at  timestamptz NOT NULL DEFAULT now()
                )
                """
            )
        for migration in known_migrations()[before:]:
            await con.execute(migration.sql)
            if migration.apply is not None:
                await migration.apply(con)
            await con.execute(
                "INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                migration.version,
                migration.description,
            )
    return before
