"""Offline verification of a data dir's audit trail (``vm-tenant audit verify``).

Three kinds of evidence are checked in one pass over the log: the hash chain itself, every
signed checkpoint (signature first, then that the log holds the same hash at that seq),
and optionally a head kept elsewhere (``--expect-head SEQ:HASH``). The first problem in
chain order wins:

- *tampered*: an entry does not parse, link or hash, or differs from a checkpoint or the
  expected head; a segment file whose name does not give the seq of its first entry (a
  renamed segment, or a ``.jsonl`` file in ``audit/`` not named like a segment); also a
  checkpoint whose signature does not verify; and a snapshot (``snapshot/state.json``)
  whose seal does not verify or that is not the fold of the log up to its anchor
  (``actors/journal/refold.py``), reported once the chain itself is found intact;
- *truncated*: the log ends before a seq that a checkpoint or the expected head names;
- *torn*: only the very last line is incomplete (a write may be in progress): intact.
"""

from __future__ import annotations

import json
from pathlib import Path

from actors.journal.chain import ChainBroken, ChainVerifier, VerifyReport
from actors.journal.checkpoint import (
    load_public_key,
    public_key_path,
    read_checkpoints,
    signature_valid,
)
from actors.journal.refold import snapshot_refold
from actors.journal.segments import iter_chunks, list_segments


def verify_data_dir(
    data_dir: Path,
    *,
    expect_head: tuple[int, str] | None = None,
    public_key: Path | None = None,
) -> VerifyReport:
    verifier = ChainVerifier()
    expected: dict[int, tuple[str, str]] = {}
    checkpoints = read_checkpoints(data_dir)
    key_path = public_key or public_key_path(data_dir)
    refold, snapshot_damage = snapshot_refold(
        data_dir, load_public_key(key_path) if key_path.exists() else None
    )
    if checkpoints:
        key = load_public_key(key_path)
        for number, checkpoint in enumerate(checkpoints, start=1):
            seq = checkpoint.get("seq") if checkpoint else None
            if (
                checkpoint is None
                or type(seq) is not int
                or not isinstance(checkpoint.get("hash"), str)
                or not signature_valid(key, checkpoint)
            ):
                bad = seq if type(seq) is int else None
                why = f"checkpoint {number} is malformed or its signature does not verify"
                return verifier.report("tampered", bad, why)
            expected[seq] = (checkpoint["hash"], f"signed checkpoint {number}")
    if expect_head is not None:
        expected[expect_head[0]] = (expect_head[1], "the expected head")

    audit_dir = data_dir / "audit"
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
