"""Snapshots and replay: rebuilding :class:`~actors.state.ProxyState` from disk.

A snapshot is the fold of the log up to an *anchor* entry, stored with that entry's
``seq``, ``hash`` and position, written atomically to ``<data-dir>/snapshot/state.json``.
A start loads it, checks that the log still holds the anchor, and replays (and verifies)
only the entries after it. The part of the chain before the anchor is verified by
:func:`verify_prefix`, in the background once the proxy serves.

Compaction (:func:`compact`) writes a new snapshot from the previous one plus the durable
entries since, reading the log rather than the live actors: the snapshot is then exactly
the fold of a durable prefix, whatever the actors are doing meanwhile.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from actors.fsutil import atomic_write
from actors.journal.chain import GENESIS, ChainBroken, ChainVerifier, VerifyReport
from actors.journal.fold import apply
from actors.journal.segments import Chunk, RawLine, iter_chunks, iter_lines
from actors.state import (
    IdempotencyRecord,
    ProxyState,
    Quota,
    TenantState,
    VmRecord,
)

SNAPSHOT_VERSION = 1


class Anchor(msgspec.Struct, frozen=True):
    """The last entry a snapshot covers and where its line starts."""

    seq: int = 0
    hash: str = GENESIS
    segment: str | None = None
    offset: int = 0


class _TenantSnapshot(msgspec.Struct):
    id: str
    quota: Quota
    tokens: list[str]
    vms: list[VmRecord]
    idempotency: dict[str, IdempotencyRecord]


class _Snapshot(msgspec.Struct):
    version: int
    anchor: Anchor
    tenants: list[_TenantSnapshot]


class SnapshotError(Exception):
    """The snapshot cannot be used with this log (unreadable, or its anchor is gone)."""


def snapshot_path(data_dir: Path) -> Path:
    return data_dir / "snapshot" / "state.json"


@contextmanager
def _bulk_build(pause_gc: bool = True) -> Iterator[None]:
    """No cyclic GC while millions of long-lived objects are created at once.

    Each collection would walk everything built so far, for nothing: the state has no
    garbage cycles. The switch is process-wide, so only the start-up, before anything
    else runs, pauses it: a compaction in a worker thread while requests are served must
    not (their task and traceback cycles would pile up meanwhile). Whoever disabled it
    first enables it again.
    """
    if not pause_gc:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load(data_dir: Path) -> tuple[ProxyState, Anchor]:
    """The newest snapshot, or an empty state anchored at the genesis."""
    with _bulk_build():
        return _load(data_dir)


def _load(data_dir: Path) -> tuple[ProxyState, Anchor]:
    path = snapshot_path(data_dir)
    state = ProxyState()
    if not path.exists():
        return state, Anchor()
    try:
        snap = msgspec.json.decode(path.read_bytes(), type=_Snapshot)
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise SnapshotError(f"{path}: unreadable snapshot: {error}") from None
    if snap.version != SNAPSHOT_VERSION:
        raise SnapshotError(f"{path}: unknown snapshot version {snap.version}")
    intern = sys.intern
    for t in snap.tenants:
        tenant = TenantState(t.id, t.quota)
        vms = t.vms
        # The decoder gives every record its own copy of strings that repeat across a
        # million VMs; sharing them is most of a record's size.
        for vm in vms:
            vm.tenant = t.id
            vm.image = intern(vm.image)
            vm.state = intern(vm.state)
            vm.settled_state = intern(vm.settled_state)
        tenant.load_vms(vms)
        tenant.load_keys(t.idempotency)
        state.add_tenant(tenant, set(t.tokens))
    return state, snap.anchor


def save(data_dir: Path, state: ProxyState, anchor: Anchor) -> None:
    """Write ``state`` as covering everything up to ``anchor``, atomically."""
    snap = _Snapshot(
        SNAPSHOT_VERSION,
        anchor,
        [
            _TenantSnapshot(
                t.id,
                t.quota,
                sorted(state.directory.tokens(t.id)),
                list(t.vms.values()),
                dict(t.idempotency),
            )
            for t in state.tenants.values()
        ],
    )
    path = snapshot_path(data_dir)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(path, msgspec.json.encode(snap))


@dataclass(slots=True)
class Replayed:
    """The result of a replay: the state, the chain head, and the last entry's position."""

    state: ProxyState
    anchor: Anchor  # the snapshot's anchor the replay started from
    head: Anchor  # the last entry replayed
    torn_cut: bool = False


def replay(
    data_dir: Path, *, upto: int | None = None, cut_torn: bool = False, pause_gc: bool = True
) -> Replayed:
    """Load the snapshot and apply the verified entries after its anchor.

    ``upto`` stops after that ``seq`` (compaction of a log that is still growing).
    ``cut_torn`` cuts an incomplete last line off the log (start-up only: the writer is
    not running yet, so such a line was never acknowledged). Any other damage raises
    :class:`~actors.chain.ChainBroken`; a snapshot whose anchor is not in the log raises
    :class:`SnapshotError`. ``pause_gc`` is for the start-up only (see :func:`_bulk_build`).
    """
    with _bulk_build(pause_gc):
        return _replay(data_dir, upto, cut_torn)


def _replay(data_dir: Path, upto: int | None, cut_torn: bool) -> Replayed:
    audit_dir = data_dir / "audit"
    state, anchor = _load(data_dir)  # the caller decided about the GC
    start, offset = _after_anchor(audit_dir, anchor)
    verifier = ChainVerifier(anchor.seq, anchor.hash)
    check = verifier.check
    result = Replayed(state, anchor, anchor)
    last: tuple[Chunk, int, dict[str, Any]] | None = None
    chunks = iter_chunks(audit_dir, start, offset)
    for chunk in chunks:
        if upto is not None and verifier.seq >= upto:
            break
        if chunk.torn:
            if any(more.lines or more.torn for more in chunks):
                raise ChainBroken(verifier.report("tampered", verifier.seq + 1, "torn line"))
            if cut_torn:
                _cut(chunk.segment, chunk.offset)
                result.torn_cut = True
            break
        lines = chunk.lines if upto is None else chunk.lines[: upto - verifier.seq]
        for data in lines:
            entry = check(data)
            apply(state, entry)
        if lines:
            last = (chunk, len(lines), entry)
    if last is not None:
        chunk, count, entry = last
        # where the last line applied starts: after the count - 1 lines (and newlines) before it
        position = chunk.offset + sum(map(len, chunk.lines[: count - 1])) + count - 1
        result.head = Anchor(entry["seq"], entry["hash"], chunk.segment.name, position)
    return result


def _after_anchor(audit_dir: Path, anchor: Anchor) -> tuple[Path | None, int]:
    """Where the line after the anchor starts, having checked the anchor is what it was.

    The anchor is looked up at its recorded offset first. If an earlier line of its
    segment changed length, the offset no longer fits; then the segment is searched for
    the anchor's seq, so that damage *before* the anchor is reported by the prefix check
    (writes refused) instead of as a missing anchor (start refused).
    """
    if anchor.seq == 0:
        return None, 0
    segment = audit_dir / (anchor.segment or "")
    if anchor.segment is None or not segment.exists():
        raise SnapshotError(f"snapshot anchor seq {anchor.seq} points into a missing segment")
    first = next(iter_lines(audit_dir, segment, anchor.offset), None)
    if first is not None and _is_anchor(first, anchor):
        return segment, first.offset + len(first.data) + 1
    for line in iter_lines(audit_dir, segment):
        if line.segment != segment:
            break
        if _is_anchor(line, anchor):
            return segment, line.offset + len(line.data) + 1
    raise SnapshotError(
        f"the log no longer holds the snapshot's anchor entry seq {anchor.seq} unchanged"
    )


def _is_anchor(line: RawLine, anchor: Anchor) -> bool:
    if not line.complete or f'"seq":{anchor.seq},'.encode() not in line.data:
        return False
    try:
        entry = msgspec.json.decode(line.data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(entry, dict)
        and entry.get("seq") == anchor.seq
        and entry.get("hash") == anchor.hash
    )


def _cut(segment: Path, offset: int) -> None:
    fd = os.open(segment, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_prefix(audit_dir: Path, anchor: Anchor) -> VerifyReport:
    """Verify the chain from the genesis up to and including the anchor entry."""
    verifier = ChainVerifier()
    check = verifier.check
    try:
        for chunk in iter_chunks(audit_dir):
            if verifier.seq >= anchor.seq:
                break
            if chunk.torn:
                return verifier.report("truncated", verifier.seq + 1, "log ends before anchor")
            for data in chunk.lines[: anchor.seq - verifier.seq]:
                check(data)
    except ChainBroken as broken:
        return broken.report
    if verifier.seq < anchor.seq:
        return verifier.report("truncated", verifier.seq + 1, "log ends before snapshot anchor")
    if verifier.head != anchor.hash:
        return verifier.report("tampered", anchor.seq, "hash differs from the snapshot anchor")
    return verifier.report()


def compact(data_dir: Path, upto: int) -> Anchor:
    """Write a new snapshot covering the durable log up to ``upto``; returns its anchor."""
    replayed = replay(data_dir, upto=upto, pause_gc=False)  # runs while the service serves
    if replayed.head.seq == replayed.anchor.seq:
        return replayed.anchor
    save(data_dir, replayed.state, replayed.head)
    return replayed.head
