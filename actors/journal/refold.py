"""A snapshot checked against the log: the chain up to its anchor, folded from the genesis.

A start uses a snapshot only when its seal verifies (``actors/journal/snapshot.py``), but
the seal is only as good as the key that made it, and that key lives in the data dir.
So once the service serves, the chain up to the snapshot's anchor is verified and folded
again from the genesis, in a worker thread (:func:`check_snapshot`), and the state it
gives is encoded the way a snapshot is: a digest that differs from the seal's means the
snapshot is not the fold of the log (rewritten by someone holding the key, or written by
a bug). Either is damage, like a broken chain: ``/readyz`` and every write answer 503.
``vm-tenant audit verify`` makes the same comparison during its one pass over the log
(:class:`Refold`, :func:`snapshot_refold`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from actors.journal.chain import ChainBroken, ChainVerifier, VerifyReport
from actors.journal.fold import apply
from actors.journal.segments import iter_chunks
from actors.journal.snapshot import Anchor, digest_of, encode, inspect
from actors.state import ProxyState


class Refold:
    """Folds the entries it sees up to ``anchor`` into a fresh state, to compare with the
    snapshot whose seal's digest is ``digest``."""

    def __init__(self, anchor: Anchor, digest: str) -> None:
        self.anchor = anchor
        self.digest = digest
        self.state = ProxyState()
        self._anchor_hash: str | None = None

    def see(self, entry: dict[str, Any]) -> None:
        """Fold ``entry`` if the snapshot covers it (entries come verified, in chain order)."""
        seq = entry["seq"]
        if seq <= self.anchor.seq:
            apply(self.state, entry)
            if seq == self.anchor.seq:
                self._anchor_hash = entry["hash"]

    def problem(self, verifier: ChainVerifier) -> VerifyReport | None:
        """What is wrong with the snapshot, once the chain is verified as far as it goes;
        None when it is the fold of the log up to its anchor."""
        anchor = self.anchor
        if self._anchor_hash is None:
            why = f"the log ends before the snapshot's anchor, seq {anchor.seq}"
            return verifier.report("truncated", verifier.seq + 1, why)
        if self._anchor_hash != anchor.hash:
            return verifier.report("tampered", anchor.seq, "hash differs from the snapshot anchor")
        if digest_of(encode(self.state, anchor)) != self.digest:
            why = f"snapshot/state.json is not the fold of the log up to seq {anchor.seq}"
            return verifier.report("tampered", anchor.seq, why)
        return None


def check_snapshot(data_dir: Path, anchor: Anchor, digest: str | None) -> VerifyReport:
    """Verify the chain up to ``anchor`` and, with a ``digest``, the snapshot against it.

    Blocking and CPU-bound: call it from a worker thread. The process-wide collector is
    left on (requests are served meanwhile).
    """
    verifier = ChainVerifier()
    check = verifier.check
    refold = Refold(anchor, digest) if digest is not None else None
    if anchor.seq == 0:
        return verifier.report()
    try:
        for chunk in iter_chunks(data_dir / "audit"):
            if verifier.seq >= anchor.seq:
                break
            if chunk.torn:
                break
            for data in chunk.lines[: anchor.seq - verifier.seq]:
                entry = check(data)
                if refold is not None:
                    refold.see(entry)
    except ChainBroken as broken:
        return broken.report
    if verifier.seq < anchor.seq:
        why = f"the log ends before the snapshot's anchor, seq {anchor.seq}"
        return verifier.report("truncated", verifier.seq + 1, why)
    if verifier.head != anchor.hash:
        return verifier.report("tampered", anchor.seq, "hash differs from the snapshot anchor")
    problem = refold.problem(verifier) if refold is not None else None
    return problem or verifier.report()


def snapshot_refold(
    data_dir: Path, key: Ed25519PublicKey | None
) -> tuple[Refold | None, tuple[int | None, str] | None]:
    """For ``audit verify``: the refold of the data dir's snapshot, or what is wrong with it
    (the seq it names, and why). Neither when there is no snapshot, or one from before
    seals (never used)."""
    inspected = inspect(data_dir, key)
    if inspected is None:
        return None, None
    anchor, digest = inspected.anchor, inspected.digest
    if anchor is None or digest is None:
        return None, (anchor.seq if anchor else None, inspected.problem or "unreadable")
    return Refold(anchor, digest), None
