"""RFC 9162 Merkle trees: hashes, roots, inclusion and consistency proofs, the frontier.

Everything here follows RFC 9162 section 2.1 to the letter: a leaf hashes as
SHA-256(0x00 || bytes), an interior node as SHA-256(0x01 || left || right), the tree over
``n`` leaves splits at the largest power of two below ``n``, and the empty tree's root is
SHA-256 of nothing.

A node is named by ``(level, index)``: the complete subtree of ``2**level`` leaves that
starts at leaf ``index << level``. Only complete subtrees are ever stored; the hash of any
other range an RFC 9162 proof needs (the right edge of a tree whose size is not a power of
two) is folded from the O(log n) complete subtrees it decomposes into. So proof generation
is split in two, with no I/O in between that this module does:

- :func:`inclusion_plan` / :func:`consistency_plan` name the complete subtrees a proof
  needs (at most about ``2 * log2(n)``), and
- :meth:`ProofPlan.assemble` folds the hashes a store returned for them into the proof.

A store (tiles on disk, a table in PostgreSQL, :class:`MemoryTree` in memory) only has to
answer "the hashes of these nodes" (:class:`HashSource`), in one batch, so a database
answers a proof in one round trip. :class:`Frontier` is the right edge of a growing tree:
O(log n) hashes, O(1) amortised work per appended leaf, the root of the current size, and
the newly completed nodes a store persists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

HASH_SIZE = 32
#: the root of the empty tree (RFC 9162 2.1.1: the hash of an empty string)
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256

NodeId = tuple[int, int]
"""``(level, index)``: the subtree over leaves ``[index << level, (index + 1) << level)``."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


class HashSource(Protocol):
    """Where proof generation reads complete-subtree hashes from."""

    def hashes(self, nodes: Sequence[NodeId]) -> list[bytes]:
        """The hash of each node in ``nodes``, in the same order.

        Every node asked for is a complete subtree inside the tree the caller knows to
        exist; a source that cannot answer (data missing or damaged) raises.
        """
        ...


def _split(width: int) -> int:
    """The largest power of two strictly below ``width`` (``width >= 2``)."""
    return 1 << ((width - 1).bit_length() - 1)


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """The complete subtrees, left to right, that make up the RFC 9162 subtree ``[begin, end)``.

    ``begin`` must be a multiple of the smallest power of two >= ``end - begin``, as every
    range the RFC's recursion visits is; the ranges are then the binary digits of the
    width, largest first.
    """
    nodes: list[NodeId] = []
    width = end - begin
    position = begin
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            nodes.append((level, position >> level))
            position += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """The root over complete subtrees given left to right, biggest first (RFC 9162 MTH)."""
    if not hashes:
        return EMPTY_ROOT
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = _sha256(b"\x01" + left + result).digest()
    return result


@dataclass(frozen=True, slots=True)
class ProofPlan:
    """The nodes a proof needs, and how many consecutive ones fold into each proof hash."""

    nodes: tuple[NodeId, ...]
    groups: tuple[int, ...]

    def assemble(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The proof, from the hashes of :attr:`nodes` (same order)."""
        if len(hashes) != len(self.nodes):
            raise ValueError(f"expected {len(self.nodes)} hashes, got {len(hashes)}")
        proof: list[bytes] = []
        at = 0
        for count in self.groups:
            proof.append(fold(hashes[at : at + count]))
            at += count
        return proof


def _plan(ranges: Iterable[tuple[int, int]]) -> ProofPlan:
    nodes: list[NodeId] = []
    groups: list[int] = []
    for begin, end in ranges:
        part = range_nodes(begin, end)
        nodes.extend(part)
        groups.append(len(part))
    return ProofPlan(tuple(nodes), tuple(groups))


def inclusion_plan(index: int, size: int) -> ProofPlan:
    """The plan of the RFC 9162 (2.1.3.1) inclusion proof of leaf ``index`` in tree ``size``."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    low, high = 0, size
    while high - low > 1:
        k = _split(high - low)
        if index < low + k:
            ranges.append((low + k, high))
            high = low + k
        else:
            ranges.append((low, low + k))
            low += k
    ranges.reverse()  # PATH lists the sibling nearest the leaf first
    return _plan(ranges)


def consistency_plan(old: int, new: int) -> ProofPlan:
    """The plan of the RFC 9162 (2.1.4.1) consistency proof from tree ``old`` to ``new``.

    Empty when ``old == new``; defined for ``1 <= old <= new``.
    """
    if not 1 <= old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    ranges: list[tuple[int, int]] = []
    low, high, whole = 0, new, True
    while old != new:
        if old == high:
            # SUBPROOF(m, D[m], b): the old tree's own subtree, which the verifier knows
            # already when it is the whole old tree (b is true)
            if not whole:
                ranges.append((low, high))
            break
        k = _split(high - low)
        if old <= low + k:
            ranges.append((low + k, high))
            high = low + k
        else:
            ranges.append((low, low + k))
            low += k
            whole = False
    ranges.reverse()
    return _plan(ranges)


def inclusion_proof(source: HashSource, index: int, size: int) -> list[bytes]:
    """The RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size`` leaves."""
    plan = inclusion_plan(index, size)
    return plan.assemble(source.hashes(plan.nodes))


def consistency_proof(source: HashSource, old: int, new: int) -> list[bytes]:
    """The RFC 9162 consistency proof from the tree of ``old`` leaves to that of ``new``."""
    plan = consistency_plan(old, new)
    return plan.assemble(source.hashes(plan.nodes))


def root(source: HashSource, size: int) -> bytes:
    """The root of the tree of ``size`` leaves, from O(log n) stored subtree hashes."""
    return fold(source.hashes(range_nodes(0, size)))


def _is_hash(value: object) -> bool:
    return type(value) is bytes and len(value) == HASH_SIZE


def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes | None:
    """The root an inclusion proof leads to (RFC 9162 2.1.3.2), or None if it cannot be one."""
    if not (0 <= index < size and _is_hash(leaf) and all(_is_hash(p) for p in proof)):
        return None
    fn, sn = index, size - 1
    result = leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            result = node_hash(p, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, p)
        fn >>= 1
        sn >>= 1
    return result if sn == 0 else None


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes
) -> bool:
    """Whether ``proof`` shows the leaf hash ``leaf`` at ``index`` in the tree ``root_hash``."""
    computed = root_from_inclusion(leaf, index, size, proof)
    return computed is not None and computed == root_hash


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree ``new_root`` extends ``old_root`` (RFC 9162 2.1.4.2).

    A tree of size 0 (whose root must be the empty root) is extended by any tree, with an
    empty proof; equal sizes need equal roots and an empty proof.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= old <= new:
        return False
    if old == 0:
        return not proof and old_root == EMPTY_ROOT
    if old == new:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


@dataclass(slots=True)
class Node:
    """A complete subtree that an append has just finished, to be persisted."""

    level: int
    index: int
    hash: bytes


class Frontier:
    """The right edge of a growing tree: the roots of its complete subtrees, biggest first.

    It holds one hash per set bit of the size (O(log n) memory), appends a leaf in O(1)
    amortised hashing, and gives the root of the current size in O(log n).
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(hashes) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {size.bit_count()} edge subtrees")
        self._size = size
        self._hashes = list(hashes)

    @classmethod
    def restore(cls, source: HashSource, size: int) -> Frontier:
        """The frontier of the stored tree of ``size`` leaves (O(log n) reads)."""
        return cls(size, source.hashes(range_nodes(0, size)))

    @property
    def size(self) -> int:
        return self._size

    def nodes(self) -> list[Node]:
        """The complete subtrees the frontier holds, left to right."""
        return [
            Node(level, index, h)
            for (level, index), h in zip(range_nodes(0, self._size), self._hashes, strict=True)
        ]

    def root(self) -> bytes:
        return fold(self._hashes)

    def edge(self) -> tuple[bytes, ...]:
        """The hashes of the complete subtrees it holds, left to right (a copy)."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> list[Node]:
        """Add a leaf hash; return the nodes it completed, the leaf itself first."""
        index = self._size
        done = [Node(0, index, leaf)]
        hashes = self._hashes
        level = 0
        current = leaf
        while index >> level & 1:
            level += 1
            current = _sha256(b"\x01" + hashes.pop() + current).digest()
            done.append(Node(level, index >> level, current))
        hashes.append(current)
        self._size = index + 1
        return done

    def extend(self, leaves: Iterable[bytes], stride: int = 0) -> list[Node]:
        """Add many leaf hashes; return the nodes completed at levels ``stride``, ``2 * stride``...

        The fast path of verifiers (``stride`` 0 reports nothing) and of stores that keep
        only every ``stride``-th level (tiles) besides the leaves they already have.
        """
        hashes = self._hashes
        pop, push, sha = hashes.pop, hashes.append, _sha256
        size = self._size
        done: list[Node] = []
        for current in leaves:
            carry = size
            level = 0
            while carry & 1:
                current = sha(b"\x01" + pop() + current).digest()
                carry >>= 1
                level += 1
                if stride and not level % stride:
                    done.append(Node(level, size >> level, current))
            push(current)
            size += 1
        self._size = size
        return done


class MemoryTree:
    """Every complete subtree hash of a tree, in memory: a :class:`HashSource` for tests,
    tools and small logs (about 64 bytes per leaf)."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        self.frontier = Frontier()
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return self.frontier.size

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash."""
        for node in self.frontier.append(leaf):
            if node.level == len(self.levels):
                self.levels.append([])
            self.levels[node.level].append(node.hash)

    def root(self) -> bytes:
        return self.frontier.root()

    def hashes(self, nodes: Sequence[NodeId]) -> list[bytes]:
        try:
            return [self.levels[level][index] for level, index in nodes]
        except IndexError:
            raise LookupError(f"tree of size {self.size} has no node among {nodes}") from None
