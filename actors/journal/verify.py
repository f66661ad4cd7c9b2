"""Offline verification of a data dir's audit trail (``vm-tenant audit verify``).

Three kinds of evidence are checked in one pass over the log: the hash chain itself, every
signed checkpoint (signature first, then that the log holds the same hash at that seq),
and optionally a head kept elsewhere (``--expect-head SEQ:HASH``). The first problem in
chain order wins:

- *tampered*: an entry does not parse, link or hash, or differs from a checkpoint or the
  expected head; also a checkpoint whose signature does not verify;
- *truncated*: the log ends before a seq that a checkpoint or the expected head names;
- *torn*: only the very last line is incomplete (a write may be in progress): intact.
"""

from __future__ import annotations

from pathlib import Path

from actors.journal.chain import ChainBroken, ChainVerifier, VerifyReport
from actors.journal.checkpoint import (
    load_public_key,
    public_key_path,
    read_checkpoints,
    signature_valid,
)
from actors.journal.segments import iter_chunks


def verify_data_dir(
    data_dir: Path,
    *,
    expect_head: tuple[int, str] | None = None,
    public_key: Path | None = None,
) -> VerifyReport:
    verifier = ChainVerifier()
    expected: dict[int, tuple[str, str]] = {}
    checkpoints = read_checkpoints(data_dir)
    if checkpoints:
        key = load_public_key(public_key or public_key_path(data_dir))
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

    torn = False
    check = verifier.check
    try:
        for chunk in iter_chunks(data_dir / "audit"):
            if torn:
                raise ChainBroken(
                    verifier.report("tampered", verifier.seq + 1, "line without newline")
                )
            if chunk.torn:
                torn = True
                continue
            for data in chunk.lines:
                entry = check(data)
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
    if torn:
        return verifier.report("torn", verifier.seq + 1, "the last line is incomplete")
    return verifier.report()
