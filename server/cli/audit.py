"""The ``audit`` commands: the admin API's reads and the checks anyone can run on a log.

``audit verify`` works offline on a data dir, or on the database of replicas
(``--store postgresql://...``). ``audit head`` and ``audit list`` read the admin API (they
live with the other admin commands, :mod:`server.cli.admin`). ``audit check`` (a tenant's
own check of its trail) and ``audit witness-key`` live with ``vm-tenant witness`` in
:mod:`server.cli.witness`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from actors.journal.chain import VerifyReport
from actors.journal.verify import verify_data_dir
from server.cli.admin import audit_head, audit_list
from server.cli.shared import CONTEXT, DEFAULT_DATA_DIR, example
from server.cli.witness import check, witness_key


@click.group(context_settings=CONTEXT)
def audit() -> None:
    """Read and verify the audit log."""


audit.add_command(audit_head)
audit.add_command(audit_list)
audit.add_command(check)
audit.add_command(witness_key)


class ExpectHead(click.ParamType[tuple[int, str]]):
    """``SEQ:HASH``: a seq >= 1 and its entry's hash (64 lowercase hex digits)."""

    name = "SEQ:HASH"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, str]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"(\d+):([0-9a-f]{64})", str(value))
        if not match or int(match.group(1)) < 1:
            self.fail("expected SEQ:HASH (a seq >= 1 and 64 lowercase hex)", param, ctx)
        return int(match.group(1)), match.group(2)


def cmd_audit_verify(args: SimpleNamespace) -> int:
    if args.store and args.store != "file":
        return _verify_store(args)
    data_dir = Path(args.data_dir)
    if not (data_dir / "audit").is_dir():
        print(f"vm-tenant: {data_dir} holds no audit log", file=sys.stderr)
        return 1
    try:
        report = verify_data_dir(
            data_dir,
            expect_head=args.expect_head,
            public_key=Path(args.public_key) if args.public_key else None,
        )
    except (OSError, ValueError) as error:
        print(f"vm-tenant: cannot verify: {error}", file=sys.stderr)
        return 1
    return _print_report(report)


def _verify_store(args: SimpleNamespace) -> int:
    """The same check of the chain the replicas keep in the database."""
    import trio

    from actors.journal.checkpoint import load_public_key
    from actors.store.postgres.bridge import StoreUnavailable
    from actors.store.postgres.tools import NoLog, verify_url

    try:
        key = load_public_key(Path(args.public_key)) if args.public_key else None
        report = trio.run(
            lambda: verify_url(args.store, expect_head=args.expect_head, public_key=key)
        )
    except (OSError, ValueError, StoreUnavailable, NoLog) as error:
        print(f"vm-tenant: cannot verify: {error}", file=sys.stderr)
        return 1
    return _print_report(report)


def _print_report(report: VerifyReport) -> int:
    head = f"head {report.head_seq}:{report.head_hash}"
    if report.verdict == "ok":
        print(f"intact: {report.entries} entries, {head}")
        return 0
    if report.verdict == "torn":
        intact = f"{report.entries} entries intact, {head}"
        print(f"torn at seq {report.bad_seq} ({report.reason}); {intact}")
        return 0
    verified = f"{report.entries} entries verified before it"
    print(f"{report.verdict} at seq {report.bad_seq}: {report.reason} ({verified})")
    return 1


@audit.command(
    epilog=example(
        "vm-tenant audit verify --data-dir /var/lib/vm-tenant",
        "vm-tenant audit verify --store postgresql://vmtenant@db:5432/vmtenant",
        'vm-tenant audit verify --expect-head "$(cat head.txt)" --public-key audit-ed25519.pub',
    )
)
@click.option(
    "--data-dir",
    metavar="DIR",
    default=DEFAULT_DATA_DIR,
    envvar="VM_TENANT_DATA_DIR",
    show_envvar=True,
    show_default=True,
    help="The data dir whose audit log to verify.",
)
@click.option(
    "--store",
    metavar="file|URL",
    envvar="VM_TENANT_STORE",
    show_envvar=True,
    help="Verify the chain in this postgresql:// database instead of a data dir.",
)
@click.option(
    "--expect-head",
    type=ExpectHead(),
    help="A head kept elsewhere (vm-tenant audit head): the log must reach it and match it.",
)
@click.option(
    "--public-key",
    metavar="FILE",
    help="Verify checkpoints with this public key (PEM), kept elsewhere.",
)
def verify(**params: Any) -> None:
    """Verify the whole audit chain and every signed checkpoint, offline.

    Exit 0 and "intact: ..." when intact (also "torn at seq N" for an incomplete last
    line: a write may be in progress); exit 1 and the first bad seq with what is wrong
    (tampered, truncated) when not. Works while the server runs.
    """
    click.get_current_context().exit(cmd_audit_verify(SimpleNamespace(**params)))
