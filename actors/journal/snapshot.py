"""Snapshots and replay: rebuilding :class:`~actors.state.ProxyState` from disk.

A snapshot is the fold of the log up to an *anchor* entry, stored with that entry's
``seq``, ``hash`` and position, written atomically to ``<data-dir>/snapshot/state.json``.
A start loads it, checks that the log still holds the anchor, and replays (and verifies)
only the entries after it. The part of the chain before the anchor, and the snapshot
itself, are checked against the log in the background once the proxy serves
(``actors/journal/refold.py``).

**A snapshot is sealed.** The file is one JSON object whose last member, ``seal``,
holds the SHA-256 of the rest (the same object without that member, byte for byte) and
an Ed25519 signature of that digest by the log's checkpoint key. A start uses a
snapshot only when its seal verifies, which costs one pass of SHA-256 over the file:
a snapshot edited by hand (a revoked token brought back, VMs dropped to get round a
quota) is never served from, not even before the background check. Such a snapshot is
damage: the state is rebuilt from the whole log instead, and the caller refuses writes.
A snapshot of version 1 (written before snapshots were sealed) is not used either, but
is not damage: the whole log is replayed once, and the next compaction seals a new one.

Compaction (:func:`compact`) writes a new snapshot from the previous one plus the durable
entries since, reading the log rather than the live actors: the snapshot is then exactly
the fold of a durable prefix, whatever the actors are doing meanwhile, and a fold of the
same prefix from the genesis gives the very same bytes (:func:`encode`).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from actors.fsutil import atomic_write
from actors.journal.chain import GENESIS, ChainBroken, ChainVerifier
from actors.journal.fold import apply
from actors.journal.segments import Chunk, RawLine, iter_chunks, iter_lines
from actors.state import (
    IdempotencyRecord,
    ProxyState,
    Quota,
    TenantState,
    VmRecord,
)

SNAPSHOT_VERSION = 2
#: the version written before snapshots were sealed: never used, never damage
LEGACY_VERSION = 1
#: what a seal's signature covers before the digest, so that it can never be taken for
#: the signature of anything else the same key signs (a checkpoint)
SEAL_CONTEXT = b"vm-tenant snapshot seal\n"
_SEAL_MEMBER = b',"seal":'


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


class Seal(msgspec.Struct, frozen=True):
    """SHA-256 (hex) of a snapshot without its seal, and the key's signature of it (base64)."""

    digest: str
    signature: str


class _Snapshot(msgspec.Struct, omit_defaults=True):
    version: int
    anchor: Anchor
    tenants: list[_TenantSnapshot]
    #: read from the file; written after the rest, see :func:`save`
    seal: Seal | None = None


class _Version(msgspec.Struct):
    version: int = 0


class SealKey(Protocol):
    """The key that seals snapshots (the log's checkpoint key, ``checkpoint.py``)."""

    def sign_bytes(self, message: bytes) -> bytes: ...

    @property
    def public_key(self) -> Ed25519PublicKey: ...


class SnapshotError(Exception):
    """The snapshot cannot be used with this log (its anchor is gone)."""


class SnapshotDamaged(SnapshotError):
    """The snapshot on disk is not one this log's key sealed: it was changed."""


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


@dataclass(slots=True)
class Loaded:
    """A snapshot as a start may use it, or why none is used."""

    state: ProxyState
    anchor: Anchor
    #: the seal's digest of the snapshot used (None: none used)
    digest: str | None = None
    #: the snapshot on disk is damaged (not sealed by the key): what is wrong with it
    damage: str | None = None
    #: the snapshot on disk is of the version before seals: not used, not damage
    legacy: bool = False


def load(data_dir: Path, key: Ed25519PublicKey | None) -> Loaded:
    """The newest snapshot if its seal verifies with ``key``, else an empty state.

    Without a key nothing is used (the caller replays the whole log).
    """
    with _bulk_build():
        return _load(data_dir, key)


def _load(data_dir: Path, key: Ed25519PublicKey | None) -> Loaded:
    path = snapshot_path(data_dir)
    empty = Loaded(ProxyState(), Anchor())
    if key is None or not path.exists():
        return empty
    data = path.read_bytes()
    seal, why = _unseal(data, key)
    if seal is None:
        if why is None:
            empty.legacy = True
        else:
            empty.damage = f"snapshot/state.json {why}"
        return empty
    try:
        snap = msgspec.json.decode(data, type=_Snapshot)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as error:
        # sealed by the key, yet not a snapshot this code reads: not one it wrote
        empty.damage = f"snapshot/state.json does not decode: {error}"
        return empty
    state = ProxyState()
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
    return Loaded(state, snap.anchor, digest=seal.digest)


def _unseal(data: bytes, key: Ed25519PublicKey) -> tuple[Seal | None, str | None]:
    """The seal of a snapshot file if it verifies; else None and what is wrong (None: the
    file is a legacy snapshot, written before seals)."""
    cut = data.rfind(_SEAL_MEMBER)
    if cut < 0:
        try:
            version = msgspec.json.decode(data, type=_Version).version
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            return None, "is not a snapshot (it does not decode)"
        return None, None if version == LEGACY_VERSION else "is not sealed"
    view = memoryview(data)
    try:
        if not data.endswith(b"}"):
            raise msgspec.DecodeError("the seal is not the last member")
        # exactly one seal object between the member's name and the closing brace
        seal = msgspec.json.decode(view[cut + len(_SEAL_MEMBER) : -1], type=Seal)
        signature = base64.b64decode(seal.signature, validate=True)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None, "has a malformed seal"
    digest = hashlib.sha256(view[:cut])
    digest.update(b"}")
    if digest.hexdigest() != seal.digest:
        return None, "differs from what its seal covers (it was edited)"
    try:
        key.verify(signature, SEAL_CONTEXT + seal.digest.encode())
    except InvalidSignature:
        return None, "is not sealed by this log's key"
    return seal, None


class _Head(msgspec.Struct):
    anchor: Anchor


@dataclass(frozen=True, slots=True)
class Inspected:
    """What ``audit verify`` learns of a snapshot without loading it."""

    #: the anchor it names (trusted only when ``problem`` is None); None if unreadable
    anchor: Anchor | None
    #: its seal's digest, when the seal verifies
    digest: str | None = None
    #: what is wrong with it (damage), if anything
    problem: str | None = None


def inspect(data_dir: Path, key: Ed25519PublicKey | None) -> Inspected | None:
    """The snapshot's anchor and seal digest, or what is wrong with it; None when there is
    no snapshot or one from before seals (never used)."""
    path = snapshot_path(data_dir)
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        anchor: Anchor | None = msgspec.json.decode(data, type=_Head).anchor
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        anchor = None
    if key is None:
        return Inspected(anchor, problem="snapshot/state.json cannot be checked: no public key")
    seal, why = _unseal(data, key)
    if seal is None:
        return None if why is None else Inspected(anchor, problem=f"snapshot/state.json {why}")
    if anchor is None:
        return Inspected(anchor, problem="snapshot/state.json does not decode")
    return Inspected(anchor, seal.digest)


def encode(state: ProxyState, anchor: Anchor) -> bytes:
    """The snapshot of ``state`` at ``anchor`` without its seal: what the seal's digest covers.

    The same state gives the same bytes, whether it was loaded from an older snapshot and
    folded on or folded from the genesis: tenants by id, tokens sorted, VMs and
    idempotency records in the order the fold made them.
    """
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
    return msgspec.json.encode(snap)


def digest_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def save(data_dir: Path, state: ProxyState, anchor: Anchor, key: SealKey) -> str:
    """Write ``state`` as covering everything up to ``anchor``, sealed, atomically.

    Returns the seal's digest.
    """
    body = encode(state, anchor)
    digest = digest_of(body)
    signature = key.sign_bytes(SEAL_CONTEXT + digest.encode())
    seal = msgspec.json.encode(Seal(digest, base64.b64encode(signature).decode()))
    path = snapshot_path(data_dir)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(path, [memoryview(body)[:-1], _SEAL_MEMBER, seal, b"}"])
    return digest


@dataclass(slots=True)
class Replayed:
    """The result of a replay: the state, the chain head, and the last entry's position."""

    state: ProxyState
    anchor: Anchor  # the snapshot's anchor the replay started from
    head: Anchor  # the last entry replayed
    #: the snapshot it started from: its digest, or why none was used
    snapshot: Loaded
    torn_cut: bool = False


def replay(
    data_dir: Path,
    *,
    key: Ed25519PublicKey | None = None,
    upto: int | None = None,
    cut_torn: bool = False,
    pause_gc: bool = True,
) -> Replayed:
    """Load the snapshot (if sealed by ``key``) and apply the verified entries after it.

    Without a ``key``, or when the snapshot's seal does not verify, the whole log is
    replayed (``Replayed.snapshot`` says why). ``upto`` stops after that ``seq``
    (compaction of a log that is still growing).
    ``cut_torn`` cuts an incomplete last line off the log (start-up only: the writer is
    not running yet, so such a line was never acknowledged). Any other damage raises
    :class:`~actors.chain.ChainBroken`; a snapshot whose anchor is not in the log raises
    :class:`SnapshotError`. ``pause_gc`` is for the start-up only (see :func:`_bulk_build`).
    """
    with _bulk_build(pause_gc):
        return _replay(data_dir, key, upto, cut_torn)


def _replay(
    data_dir: Path, key: Ed25519PublicKey | None, upto: int | None, cut_torn: bool
) -> Replayed:
    audit_dir = data_dir / "audit"
    loaded = _load(data_dir, key)  # the caller decided about the GC
    state, anchor = loaded.state, loaded.anchor
    start, offset = _after_anchor(audit_dir, anchor)
    verifier = ChainVerifier(anchor.seq, anchor.hash)
    check = verifier.check
    result = Replayed(state, anchor, anchor, loaded)
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


def compact(data_dir: Path, upto: int, key: SealKey) -> Anchor:
    """Write a new snapshot covering the durable log up to ``upto``; returns its anchor.

    :class:`SnapshotDamaged` when the snapshot on disk is not sealed by ``key``: it was
    changed while the service ran, and is left as it is.
    """
    replayed = replay(data_dir, key=key.public_key, upto=upto, pause_gc=False)
    if replayed.snapshot.damage is not None:
        raise SnapshotDamaged(replayed.snapshot.damage)
    if replayed.head.seq == replayed.anchor.seq:
        return replayed.anchor
    save(data_dir, replayed.state, replayed.head, key)
    return replayed.head
