"""Verification of the chain stored in the database (``vm-tenant audit verify --store``).

The same evidence as :func:`actors.journal.verify.verify_data_dir`, read from tables
instead of files, and the same :class:`~actors.journal.chain.VerifyReport`: every stored
line in seq order (each must parse, link and hash, and carry the seq of its row), every
signed checkpoint (signature, then the hash at its seq), optionally a head kept
elsewhere, and the recorded head (``audit_head``) against the last line. The first
problem in chain order wins: *tampered* or *truncated* (a checkpoint, the expected head or
the recorded head names a seq beyond the last line). Rows are written whole, so there is
no *torn* here.

All of it is read in one repeatable-read transaction: one consistent picture while the
replicas keep appending.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from actors.journal.chain import ChainBroken, ChainVerifier, VerifyReport
from actors.journal.checkpoint import signature_valid
from actors.store.postgres.bridge import Connection, Database

#: rows read per round trip
PAGE = 10_000


async def audit_public_key(con: Connection) -> Ed25519PublicKey | None:
    """The public half of the log's checkpoint key, if the database holds one."""
    pem = await con.fetchval(
        "SELECT secret FROM signing_keys WHERE purpose = 'audit' AND state = 'active' "
        "ORDER BY created_at DESC LIMIT 1"
    )
    if pem is None:
        return None
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the audit signing key in the database is not an Ed25519 key")
    return key.public_key()


async def verify_database(
    db: Database,
    *,
    expect_head: tuple[int, str] | None = None,
    public_key: Ed25519PublicKey | None = None,
    within: float = 3600.0,
) -> VerifyReport:
    """Verify the whole stored chain; ``public_key`` overrides the one in the database."""
    async with db.transaction("repeatable_read", within=within) as con:
        return await _verify(con, expect_head, public_key)


async def _verify(
    con: Connection,
    expect_head: tuple[int, str] | None,
    public_key: Ed25519PublicKey | None,
) -> VerifyReport:
    verifier = ChainVerifier()
    expected: dict[int, tuple[str, str]] = {}
    checkpoints = await con.fetch("SELECT seq, hash, ts, signature FROM checkpoints ORDER BY id")
    if checkpoints:
        key = public_key or await audit_public_key(con)
        for number, row in enumerate(checkpoints, start=1):
            checkpoint = dict(row)
            if key is None or not signature_valid(key, checkpoint):
                why = f"checkpoint {number} is malformed or its signature does not verify"
                return verifier.report("tampered", row["seq"], why)
            expected[row["seq"]] = (row["hash"], f"signed checkpoint {number}")
    if expect_head is not None:
        expected[expect_head[0]] = (expect_head[1], "the expected head")
    head = await con.fetchrow("SELECT seq, hash FROM audit_head")
    if head is not None and head["seq"] > 0:
        expected.setdefault(head["seq"], (head["hash"], "the recorded head"))

    check = verifier.check
    after = 0
    try:
        while True:
            rows = await con.fetch(
                "SELECT seq, line FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                after,
                PAGE,
            )
            for row in rows:
                entry = check(row["line"])
                seq = entry["seq"]
                if row["seq"] != seq:
                    why = f"row {row['seq']} holds the entry of seq {seq}"
                    raise ChainBroken(verifier.report("tampered", seq, why))
                want = expected.get(seq)
                if want is not None and want[0] != entry["hash"]:
                    raise ChainBroken(
                        verifier.report("tampered", seq, f"hash differs from {want[1]}")
                    )
            if len(rows) < PAGE:
                break
            after = rows[-1]["seq"]
    except ChainBroken as broken:
        return broken.report
    if expected:
        furthest = max(expected)
        if furthest > verifier.seq:
            origin = expected[furthest][1]
            why = f"the log ends at seq {verifier.seq} but {origin} names seq {furthest}"
            return verifier.report("truncated", verifier.seq + 1, why)
    if head is not None and head["seq"] < verifier.seq:
        why = f"the recorded head is seq {head['seq']} but the log goes on to {verifier.seq}"
        return verifier.report("tampered", head["seq"] + 1, why)
    return verifier.report()
