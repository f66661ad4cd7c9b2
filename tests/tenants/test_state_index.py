"""A tenant's VM index: the id order behind cursor pages, against a sorted-list model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.state import Quota, TenantState, VmRecord

ids = st.text("abcdef0123", min_size=1, max_size=4)
ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "page"]), ids, st.integers(1, 5)))


def record(vm_id: str) -> VmRecord:
    return VmRecord(vm_id, "acme", 1, 256, "debian-12", None, "ts", "running")


@settings(max_examples=300)
@given(ops)
def test_pages_follow_id_order_through_adds_and_removes(steps: list[tuple[str, str, int]]) -> None:
    tenant = TenantState("acme", Quota(10**6, 10**9, 10**6))
    model: set[str] = set()
    for op, vm_id, limit in steps:
        if op == "add" and vm_id not in model:
            tenant.add_vm(record(vm_id))
            model.add(vm_id)
        elif op == "remove":
            removed = tenant.remove_vm(vm_id)
            assert (removed is not None) == (vm_id in model)
            model.discard(vm_id)
        else:
            after = vm_id if limit % 2 else None
            expected = [i for i in sorted(model) if after is None or i > after][:limit]
            assert [vm.id for vm in tenant.vms_after(after, limit)] == expected
        assert set(tenant.vms) == model
        assert tenant.allocated.vms == len(model)
        assert tenant.allocated_vcpus == len(model)
    assert [vm.id for vm in tenant.vms_after(None, 10**6)] == sorted(model)


def test_load_vms_takes_any_order() -> None:
    tenant = TenantState("acme", Quota(10, 10_000, 10))
    tenant.load_vms([record(i) for i in ("c", "a", "b")])
    assert [vm.id for vm in tenant.vms_after(None, 10)] == ["a", "b", "c"]
    assert [vm.id for vm in tenant.vms_after("a", 1)] == ["b"]
    assert tenant.allocated.to_json() == {"vcpus": 3, "memory_mib": 768, "vms": 3}
    tenant.remove_vm("b")
    tenant.add_vm(record("d"))
    assert [vm.id for vm in tenant.vms_after(None, 10)] == ["a", "c", "d"]
