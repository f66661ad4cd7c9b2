"""RFC 9162 Merkle trees, checked against published vectors and an independent library.

- The vectors are those of Certificate Transparency as kept by transparency-dev/merkle
  (``proof/verify_test.go``: ``leaves``, ``roots``, ``inclusionProofs``,
  ``consistencyProofs``; Apache-2.0), written here as data.
- pymerkle (its own RFC 9162 tree, sharing no code with ours) computes roots and
  inclusion proofs for the same leaves, and its verifier checks the proofs we produce.
- Hypothesis: for random sizes and indices our proofs equal a line-by-line transcription
  of the RFC's recursive definitions, verify, and stop verifying when any bit flips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import InclusionProof, InmemoryTree

from actors.journal.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryTree,
    consistency_plan,
    consistency_proof,
    inclusion_plan,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)

h = bytes.fromhex

# transparency-dev/merkle proof/verify_test.go: the leaf data of the CT test tree
LEAVES = [h(""), h("00"), h("10"), h("2021"), h("3031"), h("40414243"), h("5051525354555657"),
          h("606162636465666768696a6b6c6d6e6f")]  # fmt: skip
# ... the roots of the trees of sizes 1 to 8
ROOTS = [
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
# ... inclusionProofs as (1-based leaf, tree size, proof)
INCLUSION = [
    (1, 1, []),
    (1, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (3, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (2, 5, [h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
]  # fmt: skip
# ... consistencyProofs as (size1, size2, proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 5, [h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (6, 7, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
]  # fmt: skip
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")

CT_TREE = MemoryTree(leaf_hash(leaf) for leaf in LEAVES)


# --- RFC 9162 2.1, transcribed as written (recursive, over leaf hashes) ----------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_mth(d: Sequence[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return node_hash(rfc_mth(d[:k]), rfc_mth(d[k:]))


def rfc_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*rfc_path(m, d[:k]), rfc_mth(d[k:])]
    return [*rfc_path(m - k, d[k:]), rfc_mth(d[:k])]


def rfc_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [rfc_mth(d)]
    k = _k(n)
    if m <= k:
        return [*rfc_subproof(m, d[:k], b), rfc_mth(d[k:])]
    return [*rfc_subproof(m - k, d[k:], False), rfc_mth(d[:k])]


BIG = 1100
BIG_LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(BIG)]
BIG_TREE = MemoryTree(BIG_LEAVES)


# --- published vectors -----------------------------------------------------------------


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root(MemoryTree(), 0) == EMPTY_ROOT
    assert Frontier().root() == EMPTY_ROOT


def test_roots_of_the_ct_tree() -> None:
    for size, expected in enumerate(ROOTS, start=1):
        assert root(CT_TREE, size) == expected
    assert CT_TREE.root() == ROOTS[-1]


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_vectors(leaf: int, size: int, proof: list[bytes]) -> None:
    assert inclusion_proof(CT_TREE, leaf - 1, size) == proof
    assert verify_inclusion(leaf_hash(LEAVES[leaf - 1]), leaf - 1, size, proof, ROOTS[size - 1])


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_vectors(old: int, new: int, proof: list[bytes]) -> None:
    assert consistency_proof(CT_TREE, old, new) == proof
    assert verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION[1:])
def test_inclusion_corruptions_fail(leaf: int, size: int, proof: list[bytes]) -> None:
    # the probes of transparency-dev's corruptInclusionProof
    index, good_root, good_leaf = leaf - 1, ROOTS[size - 1], leaf_hash(LEAVES[leaf - 1])
    probes = [
        (index - 1, size, good_root, good_leaf, proof),
        (index + 1, size, good_root, good_leaf, proof),
        (index ^ 2, size, good_root, good_leaf, proof),
        (index, size * 2, good_root, good_leaf, proof),
        (index, size // 2, good_root, good_leaf, proof),
        (index, size, good_root, b"WrongLeaf", proof),
        (index, size, EMPTY_ROOT, good_leaf, proof),
        (index, size, SOME_HASH, good_leaf, proof),
        (index, size, good_root, good_leaf, [*proof, b""]),
        (index, size, good_root, good_leaf, [*proof, good_root]),
        (index, size, good_root, good_leaf, [b"", *proof]),
        (index, size, good_root, good_leaf, [good_root, *proof]),
        (index, size, good_root, good_leaf, proof[:-1]),
        (index, size, good_root, good_leaf, [proof[0], SOME_HASH, *proof[1:]]),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 8]) + wrong[i][1:]
        probes.append((index, size, good_root, good_leaf, wrong))
    for p_index, p_size, p_root, p_leaf, p_proof in probes:
        assert not verify_inclusion(p_leaf, p_index, p_size, p_proof, p_root)


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY[1:])
def test_consistency_corruptions_fail(old: int, new: int, proof: list[bytes]) -> None:
    # the probes of transparency-dev's corruptConsistencyProof
    r1, r2 = ROOTS[old - 1], ROOTS[new - 1]
    probes = [
        (old - 1, new, r1, r2, proof),
        (old + 1, new, r1, r2, proof),
        (old ^ 2, new, r1, r2, proof),
        (old, new * 2, r1, r2, proof),
        (old, new // 2, r1, r2, proof),
        (old, new, b"WrongRoot", r2, proof),
        (old, new, r1, b"WrongRoot", proof),
        (old, new, r2, r1, proof),
        (old, new, r1, r2, []),
        (old, new, r1, r2, [*proof, b""]),
        (old, new, r1, r2, [*proof, r1]),
        (old, new, r1, r2, [*proof, r2]),
        (old, new, r1, r2, [b"", *proof]),
        (old, new, r1, r2, [r1, *proof]),
        (old, new, r1, r2, [r2, *proof]),
        (old, new, r1, r2, [proof[0], *proof]),
        (old, new, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 16]) + wrong[i][1:]
        probes.append((old, new, r1, r2, wrong))
    for p_old, p_new, p_r1, p_r2, p_proof in probes:
        assert not verify_consistency(p_old, p_new, p_r1, p_r2, p_proof)


def test_degenerate_sizes() -> None:
    one = leaf_hash(b"data")
    assert verify_inclusion(one, 0, 1, [], one)
    assert not verify_inclusion(one, 0, 0, [], one)
    assert not verify_inclusion(one, 1, 1, [], one)
    assert not verify_inclusion(b"", 0, 1, [], one)
    assert verify_consistency(0, 5, EMPTY_ROOT, ROOTS[4], [])
    assert not verify_consistency(0, 5, SOME_HASH, ROOTS[4], [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, ROOTS[4], [SOME_HASH])
    assert verify_consistency(3, 3, ROOTS[2], ROOTS[2], [])
    assert not verify_consistency(3, 3, ROOTS[2], ROOTS[3], [])
    assert not verify_consistency(3, 3, ROOTS[2], ROOTS[2], [ROOTS[2]])
    assert not verify_consistency(4, 3, ROOTS[3], ROOTS[2], [])
    for bad in ((-1, 3), (3, 3), (0, 0)):
        with pytest.raises(ValueError):
            inclusion_plan(*bad)
    for bad in ((0, 3), (4, 3), (-1, 2)):
        with pytest.raises(ValueError):
            consistency_plan(*bad)


# --- an independent implementation -----------------------------------------------------


def test_pymerkle_agrees_and_verifies_our_inclusion_proofs() -> None:
    data = [i.to_bytes(2, "big") * (i % 5 + 1) for i in range(70)]
    theirs = InmemoryTree(algorithm="sha256")
    for item in data:
        theirs.append_entry(item)
    ours = MemoryTree(leaf_hash(item) for item in data)
    for size in range(1, len(data) + 1):
        assert theirs.get_root(size) == root(ours, size)
        for index in range(size):
            proof = inclusion_proof(ours, index, size)
            reference = theirs.prove_inclusion(index + 1, size)
            assert reference.path[1:] == proof
            # pymerkle's proof object carries the leaf hash first, then the RFC path
            leaf = leaf_hash(data[index])
            check = InclusionProof("sha256", True, size, index + 1, reference.rule, [leaf, *proof])
            check.verify(leaf, theirs.get_root(size), index=index + 1, size=size)


# --- properties --------------------------------------------------------------------------


def _flip(value: bytes, bit: int) -> bytes:
    bit %= len(value) * 8
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def size_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, BIG))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(1, BIG))
    return draw(st.integers(1, new)), new


@settings(max_examples=300, deadline=None)
@given(size_and_index(), st.integers(0, 1 << 16), st.data())
def test_every_inclusion_proof_verifies_and_no_flipped_bit_does(
    case: tuple[int, int], bit: int, data: st.DataObject
) -> None:
    size, index = case
    proof = inclusion_proof(BIG_TREE, index, size)
    assert proof == rfc_path(index, BIG_LEAVES[:size])
    tree_root = root(BIG_TREE, size)
    assert tree_root == rfc_mth(BIG_LEAVES[:size])
    leaf = BIG_LEAVES[index]
    assert verify_inclusion(leaf, index, size, proof, tree_root)
    assert not verify_inclusion(_flip(leaf, bit), index, size, proof, tree_root)
    assert not verify_inclusion(leaf, index, size, proof, _flip(tree_root, bit))
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:at], _flip(proof[at], bit), *proof[at + 1 :]]
        assert not verify_inclusion(leaf, index, size, bad, tree_root)
    if size > 1:
        other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index))
        assert not verify_inclusion(leaf, other, size, proof, tree_root)


@settings(max_examples=300, deadline=None)
@given(two_sizes(), st.integers(0, 1 << 16), st.data())
def test_every_consistency_proof_verifies_and_no_flipped_bit_does(
    sizes: tuple[int, int], bit: int, data: st.DataObject
) -> None:
    old, new = sizes
    proof = consistency_proof(BIG_TREE, old, new)
    assert proof == ([] if old == new else rfc_subproof(old, BIG_LEAVES[:new], True))
    old_root, new_root = root(BIG_TREE, old), root(BIG_TREE, new)
    assert verify_consistency(old, new, old_root, new_root, proof)
    assert not verify_consistency(old, new, _flip(old_root, bit), new_root, proof)
    assert not verify_consistency(old, new, old_root, _flip(new_root, bit), proof)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:at], _flip(proof[at], bit), *proof[at + 1 :]]
        assert not verify_consistency(old, new, old_root, new_root, bad)


@settings(max_examples=200, deadline=None)
@given(size_and_index())
def test_plans_read_logarithmically_many_nodes(case: tuple[int, int]) -> None:
    size, index = case
    bound = 2 * size.bit_length()
    assert len(inclusion_plan(index, size).nodes) <= bound
    assert len(consistency_plan(index + 1, size).nodes) <= bound


def test_root_from_inclusion_names_the_root() -> None:
    proof = inclusion_proof(BIG_TREE, 700, 1000)
    assert root_from_inclusion(BIG_LEAVES[700], 700, 1000, proof) == root(BIG_TREE, 1000)
    assert root_from_inclusion(BIG_LEAVES[700], 700, 1000, proof[:-1]) is None


# --- the frontier ------------------------------------------------------------------------


def test_frontier_roots_and_completed_nodes_match_the_tree() -> None:
    frontier = Frontier()
    seen: dict[tuple[int, int], bytes] = {}
    for i, leaf in enumerate(BIG_LEAVES[:300]):
        for node in frontier.append(leaf):
            assert (node.level, node.index) not in seen
            seen[node.level, node.index] = node.hash
        assert frontier.size == i + 1
        assert frontier.root() == root(BIG_TREE, i + 1)
    # every complete subtree was reported exactly once, with its true hash
    assert seen == {
        (level, index): BIG_TREE.levels[level][index]
        for level in range(len(BIG_TREE.levels))
        for index in range(300 >> level)
    }


def test_frontier_restore_and_extend() -> None:
    for size in (0, 1, 2, 3, 255, 256, 257, 1023, 1024, BIG):
        restored = Frontier.restore(BIG_TREE, size)
        assert restored.root() == root(BIG_TREE, size)
        # one subtree per set bit of the size, biggest (leftmost) first
        levels = [level for level in reversed(range(size.bit_length())) if size >> level & 1]
        assert [node.level for node in restored.nodes()] == levels
        restored.extend(BIG_LEAVES[size:])
        assert restored.size == BIG
        assert restored.root() == BIG_TREE.root()
    with pytest.raises(ValueError):
        Frontier(3, [SOME_HASH])


def test_memory_tree_refuses_nodes_it_does_not_have() -> None:
    with pytest.raises(LookupError):
        MemoryTree(BIG_LEAVES[:5]).hashes([(3, 0)])
