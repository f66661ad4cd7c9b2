"""Verification of the chain stored in the database (``vm-tenant audit verify --store``).

The same evidence as :func:`actors.journal.verify.verify_data_dir`, read from tables
instead of files, and the same :class:`~actors.journal.chain.VerifyReport`: every stored
line in seq order (each must parse, link and hash, and carry the seq of its row), every
signed checkpoint (signature and, once the tree was kept, its note over the tree's size
and root; then the hash at its seq and the RFC 9162 root of the lines up to it),
optionally a head kept elsewhere, and the recorded head (``audit_head``) against the last
line; and the tree the replicas prove from (``merkle_nodes``) against the lines' own. The first
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
from actors.journal.merkle import Frontier, Node, leaf_hash
from actors.journal.note import NoteError, Verifier
from actors.journal.verify import checkpoint_root
from actors.store.postgres.bridge import Connection, Database
from actors.store.postgres.tree import TreeIncomplete, node_hashes

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
    roots: dict[int, tuple[bytes, str]] = {}
    checkpoints = await con.fetch(
        "SELECT seq, hash, ts, signature, root, note FROM checkpoints ORDER BY id"
    )
    if checkpoints:
        key = public_key or await audit_public_key(con)
        log_key = await _log_key(con, key)
        for number, row in enumerate(checkpoints, start=1):
            checkpoint = {name: value for name, value in dict(row).items() if value is not None}
            root = checkpoint_root(checkpoint, log_key) if "note" in checkpoint else None
            if (
                key is None
                or not signature_valid(key, checkpoint)
                or ("note" in checkpoint and root is None)
            ):
                why = f"checkpoint {number} is malformed or its signature does not verify"
                return verifier.report("tampered", row["seq"], why)
            expected[row["seq"]] = (row["hash"], f"signed checkpoint {number}")
            if root is not None:
                roots[row["seq"]] = (root, f"signed checkpoint {number}")
    if expect_head is not None:
        expected[expect_head[0]] = (expect_head[1], "the expected head")
    head = await con.fetchrow("SELECT seq, hash FROM audit_head")
    if head is not None and head["seq"] > 0:
        expected.setdefault(head["seq"], (head["hash"], "the recorded head"))

    check = verifier.check
    tree = Frontier()
    computed: list[Node] = []  # the tree's nodes the page's lines complete
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
                computed.extend(tree.append(leaf_hash(bytes(row["line"]))))
                signed = roots.get(seq)
                if signed is not None and signed[0] != tree.root():
                    why = f"the Merkle root at size {seq} differs from {signed[1]}"
                    raise ChainBroken(verifier.report("tampered", seq, why))
            await _stored_nodes_agree(con, computed, verifier)
            computed.clear()
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


async def _log_key(con: Connection, key: Ed25519PublicKey | None) -> Verifier | None:
    """The log's note verifier: its origin (``log_meta``) and the checkpoint key."""
    origin = await con.fetchval("SELECT origin FROM log_meta")
    if key is None or origin is None:
        return None
    try:
        return Verifier.from_public(origin, key)
    except (NoteError, ValueError):
        return None


async def _stored_nodes_agree(
    con: Connection, computed: list[Node], verifier: ChainVerifier
) -> None:
    """Every node of the stored tree (what the replicas make proofs of) is the one the
    lines give; ``ChainBroken`` at the last entry under the first that is not."""
    ids = [(node.level, node.index) for node in computed]
    try:
        stored = await node_hashes(con, ids)
    except TreeIncomplete:
        stored = []
    for node, hash_ in zip(computed, stored or [b""] * len(computed), strict=True):
        if hash_ != node.hash:
            seq = (node.index + 1) << node.level
            why = f"the stored Merkle tree (merkle_nodes) differs from the lines' at seq {seq}"
            raise ChainBroken(verifier.report("tampered", seq, why))
