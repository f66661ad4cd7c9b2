"""Each tenant's own entries: the trail index, its rebuild from the log, and reading pages.

Compared with the obvious answer (filter the whole log), for random logs: pages in order
with the right continuation, ownership by binary search, a tenant created again starting
afresh, and the index made at start (a pass over the log, merged later) equal to the one
the observer keeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.journal.reader import AuditReader
from actors.journal.trail import TrailIndex, scan_trails
from actors.journal.writer import AuditWriter
from conftest import audit_lines

TENANTS = ("acme", "beta", "gamma")
SOURCE = {"ip": "127.0.0.1", "token_id": "tok-test"}


def entries(ops: list[tuple[str | None, str]]) -> list[dict[str, Any]]:
    return [
        {"seq": seq, "tenant": tenant, "op": op} for seq, (tenant, op) in enumerate(ops, start=1)
    ]


def expected(log: list[dict[str, Any]], tenant: str) -> list[int]:
    """The tenant's trail by definition: its entries from its latest creation on."""
    own: list[int] = []
    for entry in log:
        if entry["tenant"] == tenant:
            if entry["op"] == "tenant.create":
                own = []
            own.append(entry["seq"])
    return own


ops = st.lists(
    st.tuples(
        st.sampled_from((*TENANTS, None)),
        st.sampled_from(("vm.spawn", "vm.destroy", "tenant.create", "token.issue")),
    ),
    max_size=120,
)


def pages(index: TrailIndex, tenant: str, limit: int) -> list[int]:
    seen: list[int] = []
    after: int | None = 0
    while after is not None:
        page, following = index.page(tenant, after, limit)
        assert len(page) <= limit
        assert following is None or following == page[-1]
        seen += page
        after = following
    return seen


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 7), st.integers(0, 120))
def test_pages_and_ownership_follow_the_definition(
    logged: list[tuple[str | None, str]], limit: int, split: int
) -> None:
    log = entries(logged)
    live = TrailIndex()
    live.add(log)
    # the same log, as a start sees it: the older part from a scan, merged after the rest
    started = TrailIndex(ready=False)
    older = TrailIndex()
    older.add(log[:split])
    started.add(log[split:])
    started.merge(dict(older._seqs))
    for tenant in TENANTS:
        want = expected(log, tenant)
        for index in (live, started):
            assert pages(index, tenant, limit) == want
            for entry in log:
                assert index.owns(tenant, entry["seq"]) == (entry["seq"] in want)
    assert live.page("nobody", 0, 10) == ([], None)


async def test_the_scan_at_start_equals_what_the_observer_keeps(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    writer = AuditWriter(audit_dir, segment_bytes=3000)
    observed = TrailIndex()
    writer.observe_durable(observed.add)
    plan = [(TENANTS[i % 3], "tenant.create" if i in (0, 1, 2, 40) else "vm.spawn")
            for i in range(90)]  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for n, (tenant, op) in enumerate(plan):
            await writer.submit(
                op=op, outcome="succeeded", tenant=tenant, vm=None, source=SOURCE,
                request_id=f"r{n}", detail={},
            ).wait()  # fmt: skip
        writer.close()
    assert len(list(audit_dir.iterdir())) > 3  # several segments
    scanned = TrailIndex(ready=False)
    scanned.merge(scan_trails(audit_dir, 90))
    stored = [json.loads(line) for line in audit_lines(tmp_path)]
    reader = AuditReader(audit_dir)
    for tenant in TENANTS:
        seqs = pages(scanned, tenant, 1000)
        assert seqs == pages(observed, tenant, 1000) == expected(stored, tenant)
        # the reader returns exactly those lines, as stored
        lines = reader.read_seqs(seqs, 90)
        assert [json.loads(line) for line in lines] == [stored[s - 1] for s in seqs]
    # beta was created again at seq 41: its trail starts there
    assert pages(scanned, "beta", 1000)[0] == 41
    # a scan up to a smaller seq stops there
    assert list(scan_trails(audit_dir, 10)["beta"]) == [2, 5, 8]


def test_the_reader_reads_scattered_seqs_across_segments(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    lines = [json.dumps({"seq": seq, "pad": "x" * (seq % 11)}).encode() for seq in range(1, 301)]
    for first in (1, 101, 201):
        (audit_dir / f"{first:012d}.jsonl").write_bytes(
            b"".join(line + b"\n" for line in lines[first - 1 : first + 99])
        )
    reader = AuditReader(audit_dir)
    wanted = [1, 2, 17, 100, 101, 150, 199, 200, 201, 299, 300]
    assert reader.read_seqs(wanted, 300) == [lines[s - 1] for s in wanted]
    # beyond the durable head or below 1: left out
    assert reader.read_seqs([0, 5, 301], 300) == [lines[4]]
    assert reader.read_seqs([250, 260], 255) == [lines[249]]
