"""The ``db`` commands: the database that replicas share (``vm-tenant db import``).

``db import`` moves a single node's data dir into an empty PostgreSQL database, so the
node's history, tenants, tokens, VMs, idempotency keys and keys carry over to replicas
(``actors/store/postgres/importer.py``). It works offline: stop the node first.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from server.cli.shared import CONTEXT, DEFAULT_DATA_DIR, example


@click.group(context_settings=CONTEXT)
def db() -> None:
    """The PostgreSQL database of replicas."""


def cmd_db_import(data_dir: Path, store: str) -> int:
    import trio

    from actors.store.postgres.bridge import StoreUnavailable
    from actors.store.postgres.importer import ImportRefused
    from actors.store.postgres.schema import SchemaError
    from actors.store.postgres.tools import import_url

    if not store.startswith(("postgresql://", "postgres://")):
        print("vm-tenant: --store must be a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        report = trio.run(import_url, store, data_dir)
    except (ImportRefused, StoreUnavailable, SchemaError) as error:
        print(f"vm-tenant: not imported: {error}", file=sys.stderr)
        return 1
    print(
        f"imported {report.entries} entries (head {report.head_seq}:{report.head_hash}), "
        f"{report.tenants} tenants, {report.vms} VMs, {report.checkpoints} checkpoints"
    )
    return 0


@db.command(
    name="import",
    epilog=example(
        "vm-tenant db import --data-dir /var/lib/vm-tenant "
        "--store postgresql://vmtenant@db:5432/vmtenant",
    ),
)
@click.option(
    "--data-dir",
    metavar="DIR",
    default=DEFAULT_DATA_DIR,
    envvar="VM_TENANT_DATA_DIR",
    show_envvar=True,
    show_default=True,
    help="The single node's data dir (stop that node first).",
)
@click.option(
    "--store",
    metavar="URL",
    required=True,
    envvar="VM_TENANT_STORE",
    show_envvar=True,
    help="The empty postgresql:// database to import into.",
)
def import_(**params: Any) -> None:
    """Move a data dir into an empty database: the whole chain with the same seqs and
    hashes, tenants, tokens, VMs, idempotency keys, the keys, origin and admin token.

    Exit 0 and a summary when imported; exit 1 and nothing changed when the database is
    not empty, cannot be reached, or the data dir's chain is damaged.
    """
    code = cmd_db_import(Path(params["data_dir"]), params["store"])
    click.get_current_context().exit(code)
