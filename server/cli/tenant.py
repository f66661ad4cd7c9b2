"""A tenant's commands: its VMs and its usage, with its own token (``--token``/``VM_TENANT_TOKEN``).

In text output ``vm spawn`` prints only the new VM's id on stdout (``VM=$(vm-tenant vm
spawn ...)``); tables are tab-separated under a header.
"""

from __future__ import annotations

from functools import partial

import click

from server.cli.params import ID, PAGE, SIZE, IdempotencyKey, Text
from server.cli.shared import (
    CONTEXT,
    Session,
    example,
    note,
    quota_text,
    table,
    tenant_options,
)
from server.client import API, Usage, Vm

VM_HEADER = ["ID", "STATE", "VCPUS", "MEMORY_MIB", "IMAGE", "NAME", "CREATED"]


def _vm_rows(vms: list[Vm]) -> str:
    rows = [
        [
            vm.id,
            vm.state,
            str(vm.vcpus),
            str(vm.memory_mib),
            vm.image,
            vm.name or "-",
            vm.created_at,
        ]
        for vm in vms
    ]
    return table(VM_HEADER, rows)


@click.group(context_settings=CONTEXT)
def vm() -> None:
    """Spawn, list, inspect and destroy your VMs."""


@vm.command(
    epilog=example(
        "VM=$(vm-tenant vm spawn --vcpus 2 --memory-mib 2048 --image debian-12 --name web-1)",
        "vm-tenant vm spawn --vcpus 1 --memory-mib 512 --image debian-12 --idempotency-key job-7",
    )
)
@click.option("--vcpus", type=SIZE, metavar="N", required=True, help="vCPUs.")
@click.option("--memory-mib", type=SIZE, metavar="N", required=True, help="Memory in MiB.")
@click.option("--image", type=Text("IMAGE", 1, 256), required=True, help="Image, 1..256 chars.")
@click.option("--name", type=Text("NAME", 1, 63), help="Name, 1..63 chars (default: none).")
@click.option(
    "--idempotency-key",
    type=IdempotencyKey(),
    help="Retry-safe key: the same key and spec never spawn twice (1..255 printable ASCII).",
)
@tenant_options
def spawn(
    session: Session,
    vcpus: int,
    memory_mib: int,
    image: str,
    name: str | None,
    idempotency_key: str | None,
) -> None:
    """Spawn a VM; prints its id once the fleet accepted it (its state goes to stderr).

    A spawn that ends in exit 3 may have happened: repeat it with the same
    --idempotency-key to get its answer without a second VM.
    """
    operation = API.spawn_vm(
        vcpus=vcpus, memory_mib=memory_mib, image=image, name=name, idempotency_key=idempotency_key
    )
    answer = session.send(operation)

    def text(spawned: Vm) -> str:
        replay = "; the answer of an earlier spawn with this key" if answer.replayed else ""
        note(f"spawned {spawned.id} ({spawned.state}{replay})")
        return spawned.id

    session.emit(answer, text)


@vm.command(name="list", epilog=example("vm-tenant vm list", "vm-tenant vm list -o json"))
@click.option(
    "--limit", type=PAGE, metavar="N", default=100, show_default=True, help="VMs per request."
)
@tenant_options
def list_vms(session: Session, limit: int) -> None:
    """List your VMs (every one that counts toward your allocation), all pages.

    json: one document, {"vms": [every VM], "next": null}.
    """
    pages = session.pages(API.list_vms(limit=limit), partial(API.next_vms, limit=limit))
    vms = [vm for page in pages for vm in page.value.vms]
    session.emit_pages(pages, "vms", lambda: _vm_rows(vms))


@vm.command(epilog=example('vm-tenant vm get "$VM"', 'vm-tenant vm get "$VM" -o json'))
@click.argument("vm_id", metavar="ID", type=ID)
@tenant_options
def get(session: Session, vm_id: str) -> None:
    """Show one VM, with its live state from the fleet."""
    session.emit(session.send(API.get_vm(vm_id)), lambda one: _vm_rows([one]))


@vm.command(epilog=example('vm-tenant vm destroy "$VM"'))
@click.argument("vm_id", metavar="ID", type=ID)
@tenant_options
def destroy(session: Session, vm_id: str) -> None:
    """Destroy a VM; answers once the fleet confirmed, and its capacity is free again."""
    answer = session.send(API.destroy_vm(vm_id))
    session.emit(answer, lambda gone: f"destroyed {gone.id}")


@click.command(
    context_settings=CONTEXT, epilog=example("vm-tenant usage", "vm-tenant usage -o json")
)
@tenant_options
def usage(session: Session) -> None:
    """Show your quota and what your VMs have allocated."""

    def text(used: Usage) -> str:
        header = ["TENANT", "QUOTA vcpus/memory_mib/vms", "ALLOCATED vcpus/memory_mib/vms"]
        return table(header, [[used.tenant, quota_text(used.quota), quota_text(used.allocated)]])

    session.emit(session.send(API.usage()), text)
