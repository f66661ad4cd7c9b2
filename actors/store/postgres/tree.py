"""The audit log's RFC 9162 Merkle tree in the database: every complete subtree, one row.

``merkle_nodes (level, idx, hash)`` holds the hash of every complete subtree of the tree
(``actors/journal/merkle.py`` names them ``(level, index)``): the leaves at level 0 and,
above them, each node as soon as its subtree is complete, about two rows per entry. They
are written with the lines that complete them, in the sequencer's batch statement (and by
``db import``), so the tree and the chain never disagree and every replica reads the same
tree. A proof is then one query: :func:`node_hashes` answers a
:class:`~actors.journal.merkle.ProofPlan`'s nodes in one ``SELECT``.

The sequencer keeps the tree's right edge (a :class:`~actors.journal.merkle.Frontier`)
in memory while it leads, restored from these rows when it takes the lead
(:func:`restore_frontier`), so appending costs O(1) amortised hashing per entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.journal.merkle import Frontier, Node, NodeId, range_nodes
from actors.store.postgres.bridge import Queries, Statement


class TreeIncomplete(LookupError):
    """A node the tree should hold is not in ``merkle_nodes`` (damage, or a bug)."""


async def node_hashes(con: Queries, nodes: Sequence[NodeId]) -> list[bytes]:
    """The hashes of ``nodes`` (complete subtrees of the stored tree), in one query."""
    if not nodes:
        return []
    rows = await con.fetch(
        "SELECT n.level, n.idx, n.hash FROM merkle_nodes n "
        "JOIN unnest($1::smallint[], $2::bigint[]) AS w (level, idx) USING (level, idx)",
        [level for level, _ in nodes],
        [index for _, index in nodes],
    )
    found = {(row["level"], row["idx"]): bytes(row["hash"]) for row in rows}
    missing = [node for node in nodes if node not in found]
    if missing:
        raise TreeIncomplete(f"merkle_nodes lacks {missing[:4]}")
    return [found[node] for node in nodes]


async def restore_frontier(con: Queries, size: int) -> Frontier:
    """The right edge of the stored tree of ``size`` leaves (one query)."""
    return Frontier(size, await node_hashes(con, range_nodes(0, size)))


def insert_nodes(nodes: Sequence[Node]) -> Statement:
    """The statement that stores ``nodes`` (for a batch's statement, behind its guard)."""
    return (
        "INSERT INTO merkle_nodes (level, idx, hash) "
        "SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[])",
        [[n.level for n in nodes], [n.index for n in nodes], [n.hash for n in nodes]],
    )


def extend(frontier: Frontier, leaves: Sequence[bytes]) -> list[Node]:
    """Append ``leaves``; every node they complete, the leaves included."""
    done: list[Node] = []
    for leaf in leaves:
        done.extend(frontier.append(leaf))
    return done
