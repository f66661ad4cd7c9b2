"""The operator's commands, through the admin API: tenants, tokens, signing keys, audit reads.

Every command here uses the admin token (:func:`~server.cli.shared.admin_options`). In
text output a command that creates something prints only its handle on stdout (the
token, the key id), so ``X=$(vm-tenant ...)`` captures it; what people need besides goes
to stderr.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import click
import msgspec

from server.cli.params import COUNT, ID, PAGE, TTL
from server.cli.shared import (
    CONTEXT,
    Session,
    admin_options,
    example,
    note,
    quota_text,
    table,
)
from server.client import (
    API,
    Answer,
    AuditPage,
    CreatedTenant,
    IssuedToken,
    KeyList,
    Quota,
    SigningKey,
    Tenant,
)

F = TypeVar("F", bound=Callable[..., Any])

TENANT_HEADER = ["ID", "QUOTA vcpus/memory_mib/vms", "ALLOCATED vcpus/memory_mib/vms"]


def _tenant_rows(tenants: list[Tenant]) -> str:
    rows = [[t.id, quota_text(t.quota), quota_text(t.allocated)] for t in tenants]
    return table(TENANT_HEADER, rows)


def _expiry(expires_at: str | None) -> str:
    return f", expires {expires_at}" if expires_at else ""


def quota_options(command: F) -> F:
    """``--vcpus``, ``--memory-mib`` and ``--vms``: a whole quota, each 0..2^31-1."""
    for flag, what in (("--vms", "VMs"), ("--memory-mib", "MiB of memory"), ("--vcpus", "vCPUs")):
        command = click.option(
            flag, type=COUNT, metavar="N", required=True, help=f"Quota: {what}."
        )(command)
    return command


class _StoredLines(msgspec.Struct):
    """An audit page whose entries stay the exact bytes the server stored."""

    entries: list[msgspec.Raw]


def _stored_lines(pages: list[Answer[AuditPage]]) -> str:
    lines = (
        bytes(entry).decode()
        for page in pages
        for entry in msgspec.json.decode(page.body, type=_StoredLines).entries
    )
    return "\n".join(lines)


# -- tenant ------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def tenant() -> None:
    """Provision tenants: create, inspect, change quotas, list, delete."""


@tenant.command(
    epilog=example(
        "vm-tenant tenant create acme --vcpus 8 --memory-mib 16384 --vms 4",
        "TOKEN=$(vm-tenant tenant create acme --vcpus 8 --memory-mib 16384 --vms 4 --ttl 86400)",
    )
)
@click.argument("tenant_id", metavar="ID")
@quota_options
@click.option("--ttl", type=TTL, metavar="SECONDS", help="Lifetime of the first token.")
@admin_options
def create(
    session: Session, tenant_id: str, vcpus: int, memory_mib: int, vms: int, ttl: int | None
) -> None:
    """Provision a tenant with a quota; prints its first bearer token.

    ID matches ^[a-z0-9][a-z0-9-]{0,62}$. The token id goes to stderr (json: every member).
    """
    quota = Quota(vcpus=vcpus, memory_mib=memory_mib, vms=vms)
    answer = session.send(API.create_tenant(tenant_id, quota, token_ttl=ttl))

    def text(created: CreatedTenant) -> str:
        expiry = _expiry(created.expires_at)
        note(f"created tenant {created.id} (token id {created.token_id}{expiry})")
        return created.token

    session.emit(answer, text)


@tenant.command(epilog=example("vm-tenant tenant get acme", "vm-tenant tenant get acme -o json"))
@click.argument("tenant_id", metavar="ID", type=ID)
@admin_options
def get(session: Session, tenant_id: str) -> None:
    """Show a tenant's quota and what it has allocated."""
    session.emit(session.send(API.get_tenant(tenant_id)), lambda t: _tenant_rows([t]))


@tenant.command(
    epilog=example("vm-tenant tenant update acme --vcpus 16 --memory-mib 32768 --vms 8")
)
@click.argument("tenant_id", metavar="ID", type=ID)
@quota_options
@admin_options
def update(session: Session, tenant_id: str, vcpus: int, memory_mib: int, vms: int) -> None:
    """Set a tenant's quota (all three dimensions).

    A quota below what is allocated is allowed; it only blocks further spawns.
    """
    quota = Quota(vcpus=vcpus, memory_mib=memory_mib, vms=vms)
    answer = session.send(API.update_tenant(tenant_id, quota))
    session.emit(answer, lambda t: _tenant_rows([t]))


@tenant.command(epilog=example("vm-tenant tenant delete acme"))
@click.argument("tenant_id", metavar="ID", type=ID)
@admin_options
def delete(session: Session, tenant_id: str) -> None:
    """Delete a tenant that has no VMs; all its tokens stop working.

    json: the API answers 204 without a body, printed as {}.
    """
    answer = session.send(API.delete_tenant(tenant_id))
    session.emit(answer, lambda _: f"deleted tenant {tenant_id}")


@tenant.command(
    name="list",
    epilog=example("vm-tenant tenant list", "vm-tenant tenant list -o json --limit 1000"),
)
@click.option(
    "--limit", type=PAGE, metavar="N", default=100, show_default=True, help="Tenants per request."
)
@admin_options
def list_tenants(session: Session, limit: int) -> None:
    """List every tenant by id, following the pages to the end.

    json: one document, {"tenants": [every tenant], "next": null}.
    """
    pages = session.pages(API.list_tenants(limit=limit), partial(API.next_tenants, limit=limit))
    tenants = [t for page in pages for t in page.value.tenants]
    session.emit_pages(pages, "tenants", lambda: _tenant_rows(tenants))


# -- token -------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def token() -> None:
    """Issue and revoke tenant tokens."""


@token.command(
    epilog=example(
        "TOKEN=$(vm-tenant token issue acme)",
        "vm-tenant token issue acme --ttl 3600 -o json",
    )
)
@click.argument("tenant_id", metavar="ID", type=ID)
@click.option("--ttl", type=TTL, metavar="SECONDS", help="Lifetime of the token (default: none).")
@admin_options
def issue(session: Session, tenant_id: str, ttl: int | None) -> None:
    """Issue a token for a tenant; prints the token (its id goes to stderr)."""
    answer = session.send(API.issue_token(tenant_id, ttl=ttl))

    def text(issued: IssuedToken) -> str:
        note(f"issued token id {issued.token_id}{_expiry(issued.expires_at)}")
        return issued.token

    session.emit(answer, text)


@token.command(epilog=example("vm-tenant token revoke acme tok-0123456789abcdef"))
@click.argument("tenant_id", metavar="ID", type=ID)
@click.argument("token_id", metavar="TOKEN_ID", type=ID)
@admin_options
def revoke(session: Session, tenant_id: str, token_id: str) -> None:
    """Revoke one token of a tenant: it answers 401 from then on, also after a restart.

    json: the API answers 204 without a body, printed as {}.
    """
    answer = session.send(API.revoke_token(tenant_id, token_id))
    session.emit(answer, lambda _: f"revoked token {token_id} of tenant {tenant_id}")


# -- keys --------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def keys() -> None:
    """Rotate the keys that sign tokens and cursors."""


def _key_state(key: SigningKey) -> str:
    state = "signing" if key.signing else key.state
    return f"{state} (retired {key.retired_at})" if key.retired_at else state


@keys.command(name="list", epilog=example("vm-tenant keys list"))
@admin_options
def list_keys(session: Session) -> None:
    """List the signing keys: id, created, state (signing, active, retired); never a secret."""

    def text(listing: KeyList) -> str:
        rows = [[key.id, key.created_at, _key_state(key)] for key in listing.keys]
        return table(["ID", "CREATED", "STATE"], rows)

    session.emit(session.send(API.list_keys()), text)


@keys.command(epilog=example("NEW_KEY=$(vm-tenant keys rotate)"))
@admin_options
def rotate(session: Session) -> None:
    """Add a signing key that signs from now on; prints its id. Older tokens keep working."""

    def text(key: SigningKey) -> str:
        note(f"signing key {key.id} added; it signs from now on")
        return key.id

    session.emit(session.send(API.rotate_key()), text)


@keys.command(epilog=example('vm-tenant keys retire "$OLD_KEY"'))
@click.argument("key_id", metavar="KEY_ID", type=ID)
@admin_options
def retire(session: Session, key_id: str) -> None:
    """Retire a key: tokens it signed answer 401. The signing key cannot be retired.

    json: the API answers 204 without a body, printed as {}.
    """
    answer = session.send(API.retire_key(key_id))
    session.emit(answer, lambda _: f"retired signing key {key_id}")


# -- audit reads -------------------------------------------------------------------------------


@click.command(
    name="head",
    context_settings=CONTEXT,
    epilog=example(
        "HEAD=$(vm-tenant audit head)",
        'vm-tenant audit verify --expect-head "$HEAD"',
        "vm-tenant audit head -o json > head.json",
    ),
)
@admin_options
def audit_head(session: Session) -> None:
    """Print the signed head of the audit log as SEQ:HASH.

    SEQ:HASH is what audit verify --expect-head takes.

    Keep it (or the whole signed checkpoint, -o json) outside this machine.
    """
    session.emit(session.send(API.audit_head()), lambda head: f"{head.seq}:{head.hash}")


@click.command(
    name="list",
    context_settings=CONTEXT,
    epilog=example("vm-tenant audit list --after 100", "vm-tenant audit list -o json"),
)
@click.option(
    "--after", type=click.IntRange(0, 2**63 - 1), metavar="SEQ", default=0, help="Start after it."
)
@click.option(
    "--limit", type=PAGE, metavar="N", default=1000, show_default=True, help="Entries per request."
)
@admin_options
def audit_list(session: Session, after: int, limit: int) -> None:
    """Print the audit entries as stored, one per line.

    From after --after to the head.

    json: one document, {"entries": [every entry], "head": {"seq", "hash"}}.
    """
    first = API.read_audit(after=after, limit=limit)
    pages = session.pages(first, partial(API.next_audit, limit=limit))
    session.emit_pages(pages, "entries", lambda: _stored_lines(pages))
