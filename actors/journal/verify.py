"""Offline verification of a data dir's audit trail (``vm-tenant audit verify``).

Four kinds of evidence are checked: the hash chain itself, every signed checkpoint
(signatures first: the v1 one over ``{seq, hash, ts}`` and, when it has one, its C2SP
note over the tree's size and root; then that the log holds the same hash at that seq),
the RFC 9162 root of the stored lines at every checkpoint that carries one, and
optionally a head kept elsewhere (``--expect-head SEQ:HASH``). The first problem in chain
order wins:

- *tampered*: an entry does not parse, link or hash, or differs from a checkpoint or the
  expected head; the stored lines up to a checkpoint's size do not have its root (a line
  that decodes to the signed entry but is not its stored bytes, or a tree that was
  signed over other lines); a segment file whose name does not give the seq of its first
  entry (a renamed segment, or a ``.jsonl`` file in ``audit/`` not named like a segment);
  also a checkpoint whose signature or note does not verify; and a snapshot
  (``snapshot/state.json``) whose seal does not verify or that is not the fold of the log
  up to its anchor (``actors/journal/refold.py``), reported once the chain itself is found
  intact;
- *truncated*: the log ends before a seq that a checkpoint or the expected head names;
- *torn*: only the very last line is incomplete (a write may be in progress): intact.

The roots are computed by :func:`tree_roots`, which needs only the raw lines: on a big
log it runs in a second process over the same segments while this one checks the
chain, so the two cores share the work and the rate stays that of the chain check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from actors.journal.chain import ChainBroken, ChainVerifier, VerifyReport
from actors.journal.checkpoint import (
    load_public_key,
    origin_path,
    public_key_path,
    read_checkpoints,
    read_origin,
    signature_valid,
)
from actors.journal.merkle import Frontier
from actors.journal.note import NoteError, Verifier, open_checkpoint, parse_note
from actors.journal.refold import Refold, snapshot_refold
from actors.journal.segments import iter_chunks, list_segments

#: from this many bytes of segments on, the roots are computed in a second process
#: (starting one costs about 0.1 s; below this the same work takes about as long inline)
PARALLEL_BYTES = 64 * 1024 * 1024


def tree_roots(audit_dir: str, sizes: list[int]) -> dict[int, bytes]:
    """The RFC 9162 root of the first ``size`` stored lines, for each of ``sizes`` that the
    log reaches (complete lines only). Needs no parsing: a second process can run it."""
    wanted = sorted(set(sizes))
    roots: dict[int, bytes] = {}
    if not wanted:
        return roots
    frontier = Frontier()
    sha = hashlib.sha256
    at = 0
    for chunk in iter_chunks(Path(audit_dir)):
        if chunk.torn:
            break
        lines, start = chunk.lines, 0
        while start < len(lines):
            take = min(len(lines) - start, wanted[at] - frontier.size)
            frontier.extend([sha(b"\x00" + line).digest() for line in lines[start : start + take]])
            start += take
            if frontier.size == wanted[at]:
                roots[wanted[at]] = frontier.root()
                at += 1
                if at == len(wanted):
                    return roots
    return roots


class _Signed:
    """What the stored checkpoints promise: hashes by seq, roots by size (with their names)."""

    def __init__(self) -> None:
        self.hashes: dict[int, tuple[str, str]] = {}
        self.roots: dict[int, tuple[bytes, str]] = {}


def _read_signed(
    data_dir: Path, public_key: Path | None, verifier: ChainVerifier
) -> _Signed | VerifyReport:
    """Every stored checkpoint, its signatures verified; a report when one fails."""
    signed = _Signed()
    checkpoints = read_checkpoints(data_dir)
    if not checkpoints:
        return signed
    key = load_public_key(public_key or public_key_path(data_dir))
    log_key: Verifier | None = None
    for number, checkpoint in enumerate(checkpoints, start=1):
        seq = checkpoint.get("seq") if checkpoint else None
        name = f"signed checkpoint {number}"
        root = None
        if checkpoint is not None and "note" in checkpoint:
            log_key = log_key or _log_key(data_dir, key, checkpoint["note"])
            root = checkpoint_root(checkpoint, log_key)
        if (
            checkpoint is None
            or type(seq) is not int
            or not isinstance(checkpoint.get("hash"), str)
            or not signature_valid(key, checkpoint)
            or ("note" in checkpoint and root is None)
        ):
            bad = seq if type(seq) is int else None
            why = f"checkpoint {number} is malformed or its signature does not verify"
            return verifier.report("tampered", bad, why)
        signed.hashes[seq] = (checkpoint["hash"], name)
        if root is not None:
            signed.roots[seq] = (root, name)
    return signed


def _log_key(data_dir: Path, key: Ed25519PublicKey, note: object) -> Verifier | None:
    """The log's note verifier: its origin as stored (else as the first note names it)."""
    try:
        if origin_path(data_dir).exists():
            origin = read_origin(data_dir)
        else:
            origin = parse_note(str(note)).text.partition("\n")[0]
        return Verifier.from_public(origin, key)
    except (OSError, ValueError, NoteError):
        return None


def checkpoint_root(checkpoint: dict[str, Any], log_key: Verifier | None) -> bytes | None:
    """The root a stored checkpoint signs, if its note verifies and agrees with its members
    (also for the checkpoints a PostgreSQL store keeps in its ``checkpoints`` table)."""
    if log_key is None or not isinstance(checkpoint.get("note"), str):
        return None
    try:
        tree, _ = open_checkpoint(checkpoint["note"], log_key)
        root = base64.b64decode(str(checkpoint.get("root")), validate=True)
    except (NoteError, binascii.Error, ValueError):
        return None
    seq = checkpoint.get("seq")
    if tree.size != seq or checkpoint.get("size", seq) != seq or tree.root != root:
        return None
    return root


def _start_roots(audit_dir: Path, sizes: list[int]) -> tuple[Future[dict[int, bytes]], Any]:
    """:func:`tree_roots` in a second process (``spawn``: nothing of this one is copied)."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return pool.submit(tree_roots, str(audit_dir), sizes), pool


def verify_data_dir(
    data_dir: Path,
    *,
    expect_head: tuple[int, str] | None = None,
    public_key: Path | None = None,
) -> VerifyReport:
    verifier = ChainVerifier()
    signed = _read_signed(data_dir, public_key, verifier)
    if isinstance(signed, VerifyReport):
        return signed
    key_path = public_key or public_key_path(data_dir)
    snapshot = snapshot_refold(data_dir, load_public_key(key_path) if key_path.exists() else None)
    audit_dir = data_dir / "audit"
    sizes = sorted(signed.roots)
    if sizes and sum(p.stat().st_size for p in list_segments(audit_dir)) >= PARALLEL_BYTES:
        future, pool = _start_roots(audit_dir, sizes)
        try:
            report = _verify_chain(audit_dir, verifier, signed, expect_head, snapshot)
            roots = future.result()
        finally:
            pool.shutdown(cancel_futures=True)
    else:
        report = _verify_chain(audit_dir, verifier, signed, expect_head, snapshot)
        roots = tree_roots(str(audit_dir), sizes) if sizes else {}
    for size in sizes:
        if not report.intact and report.bad_seq is not None and report.bad_seq <= size:
            break
        want, name = signed.roots[size]
        if size in roots and roots[size] != want:
            why = f"the Merkle root at size {size} differs from {name}"
            return VerifyReport(
                "tampered", report.entries, report.head_seq, report.head_hash, size, why
            )
    return report


def _verify_chain(
    audit_dir: Path,
    verifier: ChainVerifier,
    signed: _Signed,
    expect_head: tuple[int, str] | None,
    snapshot: tuple[Refold | None, tuple[int | None, str] | None],
) -> VerifyReport:
    """The chain, the signed hashes, the expected head and the snapshot's refold, in one
    pass over the log."""
    refold, snapshot_damage = snapshot
    expected = dict(signed.hashes)
    if expect_head is not None:
        expected[expect_head[0]] = (expect_head[1], "the expected head")
    stray = _misnamed(audit_dir)
    if stray is not None:
        why = f"audit/{stray.name} is not named by its first seq"
        return verifier.report("tampered", _first_seq(stray), why)
    torn = False
    check = verifier.check
    named: Path | None = None  # the segment whose first entry was checked against its name
    try:
        for chunk in iter_chunks(audit_dir):
            if torn:
                raise ChainBroken(
                    verifier.report("tampered", verifier.seq + 1, "line without newline")
                )
            if chunk.torn:
                torn = True
                continue
            for data in chunk.lines:
                entry = check(data)
                if refold is not None:
                    refold.see(entry)
                if chunk.segment != named:
                    named = chunk.segment
                    if entry["seq"] != int(named.stem):
                        why = f"segment {named.name} begins with seq {entry['seq']}"
                        raise ChainBroken(verifier.report("tampered", entry["seq"], why))
                want = expected.get(entry["seq"])
                if want is not None and want[0] != entry["hash"]:
                    raise ChainBroken(
                        verifier.report("tampered", entry["seq"], f"hash differs from {want[1]}")
                    )
    except ChainBroken as broken:
        return broken.report
    if expected:
        furthest = max(expected)
        if furthest > verifier.seq:
            origin = expected[furthest][1]
            why = f"the log ends at seq {verifier.seq} but {origin} names seq {furthest}"
            return verifier.report("truncated", verifier.seq + 1, why)
    if snapshot_damage is not None:
        claimed, why = snapshot_damage
        return verifier.report("tampered", claimed or verifier.seq, why)
    if refold is not None and (problem := refold.problem(verifier)) is not None:
        return problem
    if torn:
        return verifier.report("torn", verifier.seq + 1, "the last line is incomplete")
    return verifier.report()


def _misnamed(audit_dir: Path) -> Path | None:
    """A ``.jsonl`` file in ``audit/`` that is not named like a segment, if there is one.

    Such a file is left out of the chain, so a segment renamed that way would silently
    drop its entries from what is verified.
    """
    if not audit_dir.is_dir():
        return None
    segments = set(list_segments(audit_dir))
    for path in sorted(audit_dir.glob("*.jsonl")):
        if path not in segments:
            return path
    return None


def _first_seq(path: Path) -> int | None:
    """The seq of a file's first entry, when its first line says one."""
    with path.open("rb") as f:
        line = f.readline(1024 * 1024)
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if type(seq) is int else None
