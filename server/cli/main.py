"""The ``vm-tenant`` command: its tree of subcommands, ``--version``, and :func:`main`.

Each subcommand lives in the module of its concern and is imported only when it runs
(or when help lists it), so a client command does not pay for importing the server:

- :mod:`server.cli.serve`: ``serve``, ``config show``
- :mod:`server.cli.admin`: ``tenant``, ``token``, ``keys`` (and ``audit head|list``)
- :mod:`server.cli.tenant`: ``vm``, ``usage``
- :mod:`server.cli.audit`: ``audit`` (``verify``, and the admin reads)
- :mod:`server.cli.db`: ``db import`` (a data dir into the replicas' database)
- :mod:`server.cli.witness`: ``witness``, ``audit check``, ``audit witness-key``

What the client commands share (connection options, output, exit codes) is in
:mod:`server.cli.shared`, their parameter types in :mod:`server.cli.params`.

A new top-level command is one line in :data:`COMMANDS`. Exit codes of client commands
are set in :mod:`server.cli.shared`; usage errors exit 2 (click's own).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping

import click

from server.cli.shared import CONTEXT

PROG = "vm-tenant"
PACKAGE = "service-vm-tenant"

#: top-level command -> "module:attribute" of its click command or group
COMMANDS: Mapping[str, str] = {
    "serve": "server.cli.serve:serve_command",
    "config": "server.cli.serve:config",
    "tenant": "server.cli.admin:tenant",
    "token": "server.cli.admin:token",
    "keys": "server.cli.admin:keys",
    "vm": "server.cli.tenant:vm",
    "usage": "server.cli.tenant:usage",
    "audit": "server.cli.audit:audit",
    "db": "server.cli.db:db",
    "witness": "server.cli.witness:witness",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click's documented pattern)."""

    def __init__(self, *args: object, lazy: Mapping[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command), self.lazy[cmd_name]
        return command


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings=CONTEXT,
    epilog=(
        "\b\nExamples:\n"
        "  vm-tenant serve --data-dir ./vm-tenant-data\n"
        "  vm-tenant tenant create acme --vcpus 8 --memory-mib 16384 --vms 4\n"
        "  VM_TENANT_TOKEN=... vm-tenant vm list -o json\n"
        "\b\nExit codes of client commands: 0 done, 1 the server refused (4xx),\n"
        "2 usage error, 3 the server could not be reached or answered 5xx.\n"
        'Shell completion (bash): eval "$(_VM_TENANT_COMPLETE=bash_source vm-tenant)"'
    ),
)
@click.version_option(package_name=PACKAGE, prog_name=PROG, message="%(prog)s %(version)s")
def cli() -> None:
    """The tenant proxy of a VM resource pool: run it, and use it as operator or tenant."""


def main(argv: list[str] | None = None) -> int:
    """Run ``vm-tenant`` with ``argv`` (default: the process's); its exit code."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Client commands print their own results; httpx's per-request lines are noise there.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cli.main(args=argv, prog_name=PROG)
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        click.echo(code, err=True)
        return 1
    return 0
