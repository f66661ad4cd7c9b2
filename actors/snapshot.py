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

import datetime as dt
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from actors.chain import (
    GENESIS,
    ChainBroken,
    ChainVerifier,
    RawLine,
    VerifyReport,
    iter_lines,
)
from actors.fsutil import atomic_write
from actors.state import (
    IDEMPOTENCY_TTL_SECONDS,
    IdempotencyRecord,
    ProxyState,
    Quota,
    TenantState,
    VmRecord,
    apply,
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


def load(data_dir: Path) -> tuple[ProxyState, Anchor]:
    """The newest snapshot, or an empty state anchored at the genesis."""
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
        tenant = TenantState(t.id, t.quota, set(t.tokens))
        vms = t.vms
        # The decoder gives every record its own copy of strings that repeat across a
        # million VMs; sharing them is most of a record's size.
        for vm in vms:
            vm.tenant = t.id
            vm.image = intern(vm.image)
            vm.state = intern(vm.state)
            vm.settled_state = intern(vm.settled_state)
        tenant.load_vms(vms)
        tenant.idempotency = t.idempotency
        state.tenants[t.id] = tenant
    return state, snap.anchor


def save(data_dir: Path, state: ProxyState, anchor: Anchor) -> None:
    """Write ``state`` as covering everything up to ``anchor``, atomically."""
    snap = _Snapshot(
        SNAPSHOT_VERSION,
        anchor,
        [
            _TenantSnapshot(
                t.id, t.quota, sorted(t.tokens), list(t.vms.values()), dict(t.idempotency)
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
    last_ts: str | None = None


def replay(data_dir: Path, *, upto: int | None = None, cut_torn: bool = False) -> Replayed:
    """Load the snapshot and apply the verified entries after its anchor.

    ``upto`` stops after that ``seq`` (compaction of a log that is still growing).
    ``cut_torn`` cuts an incomplete last line off the log (start-up only: the writer is
    not running yet, so such a line was never acknowledged). Any other damage raises
    :class:`~actors.chain.ChainBroken`; a snapshot whose anchor is not in the log raises
    :class:`SnapshotError`.
    """
    audit_dir = data_dir / "audit"
    state, anchor = load(data_dir)
    lines = _lines_from_anchor(audit_dir, anchor)
    verifier = ChainVerifier(anchor.seq, anchor.hash)
    result = Replayed(state, anchor, anchor)
    last: tuple[RawLine, dict[str, Any]] | None = None
    for line in lines:
        if upto is not None and verifier.seq >= upto:
            break
        if not line.complete:
            if next(lines, None) is not None:
                raise ChainBroken(verifier.report("tampered", verifier.seq + 1, "torn line"))
            if cut_torn:
                _cut(line.segment, line.offset)
                result.torn_cut = True
            break
        entry = verifier.check(line.data)
        apply(state, entry)
        last = (line, entry)
    if last is not None:
        line, entry = last
        result.head = Anchor(entry["seq"], entry["hash"], line.segment.name, line.offset)
        result.last_ts = entry["ts"]
    return result


def _lines_from_anchor(audit_dir: Path, anchor: Anchor) -> Iterator[RawLine]:
    """Lines after the anchor, having checked that the anchor line is still what it was.

    The anchor is looked up at its recorded offset first. If an earlier line of its
    segment changed length, the offset no longer fits; then the segment is searched for
    the anchor's seq, so that damage *before* the anchor is reported by the prefix check
    (writes refused) instead of as a missing anchor (start refused).
    """
    if anchor.seq == 0:
        return iter_lines(audit_dir)
    segment = audit_dir / (anchor.segment or "")
    if anchor.segment is None or not segment.exists():
        raise SnapshotError(f"snapshot anchor seq {anchor.seq} points into a missing segment")
    lines = iter_lines(audit_dir, segment, anchor.offset)
    first = next(lines, None)
    if first is not None and _is_anchor(first, anchor):
        return lines
    lines = iter_lines(audit_dir, segment)
    for line in lines:
        if line.segment != segment:
            break
        if _is_anchor(line, anchor):
            return lines
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
    try:
        for line in iter_lines(audit_dir):
            if verifier.seq >= anchor.seq:
                break
            if not line.complete:
                return verifier.report("truncated", verifier.seq + 1, "log ends before anchor")
            verifier.check(line.data)
    except ChainBroken as broken:
        return broken.report
    if verifier.seq < anchor.seq:
        return verifier.report("truncated", verifier.seq + 1, "log ends before snapshot anchor")
    if verifier.head != anchor.hash:
        return verifier.report("tampered", anchor.seq, "hash differs from the snapshot anchor")
    return verifier.report()


def compact(data_dir: Path, upto: int) -> Anchor:
    """Write a new snapshot covering the durable log up to ``upto``; returns its anchor."""
    replayed = replay(data_dir, upto=upto)
    if replayed.head.seq == replayed.anchor.seq:
        return replayed.anchor
    if replayed.last_ts is not None:
        _prune_idempotency(replayed.state, replayed.last_ts)
    save(data_dir, replayed.state, replayed.head)
    return replayed.head


def _prune_idempotency(state: ProxyState, now_ts: str) -> None:
    now = _parse_ts(now_ts)
    for tenant in state.tenants.values():
        expired = [
            key
            for key, record in tenant.idempotency.items()
            if record.status
            and (now - _parse_ts(record.created)).total_seconds() > IDEMPOTENCY_TTL_SECONDS
        ]
        for key in expired:
            del tenant.idempotency[key]


def _parse_ts(ts: str) -> dt.datetime:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
