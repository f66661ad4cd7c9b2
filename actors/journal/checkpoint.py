"""Signed checkpoints of the audit chain's head.

A hash chain alone cannot show that its newest entries were deleted, or that the whole
log was rewritten with fresh hashes. So the proxy periodically (and on shutdown) signs
``{seq, hash, ts}`` of its durable head with an Ed25519 key of its own and appends the
result to ``<data-dir>/audit-checkpoints.jsonl``. The private key lives in
``<data-dir>/keys/audit-ed25519.key`` (0600); the public key is exported beside it as
``audit-ed25519.pub`` so an operator can keep a copy elsewhere, as they can keep the
latest checkpoint (``GET /v1/admin/audit/head``). The same key seals snapshots
(``actors/journal/snapshot.py``), with a context of their own in what it signs.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from actors.fsutil import create_private, fsync_dir
from actors.journal.chain import canonical


def checkpoints_path(data_dir: Path) -> Path:
    return data_dir / "audit-checkpoints.jsonl"


def public_key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "audit-ed25519.pub"


def _signed_bytes(checkpoint: dict[str, Any]) -> bytes:
    return canonical({"seq": checkpoint["seq"], "hash": checkpoint["hash"], "ts": checkpoint["ts"]})


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def signature_valid(key: Ed25519PublicKey, checkpoint: dict[str, Any]) -> bool:
    try:
        signature = base64.b64decode(str(checkpoint["signature"]), validate=True)
        key.verify(signature, _signed_bytes(checkpoint))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


def read_checkpoints(data_dir: Path) -> list[dict[str, Any] | None]:
    """Every stored checkpoint in order; ``None`` for a line that does not parse."""
    path = checkpoints_path(data_dir)
    if not path.exists():
        return []
    result: list[dict[str, Any] | None] = []
    for line in path.read_bytes().splitlines():
        try:
            value = msgspec.json.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError):
            result.append(None)
            continue
        result.append(value if isinstance(value, dict) else None)
    return result


class CheckpointSigner:
    """Signs heads and appends them, durably, to the checkpoint file."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        keys = data_dir / "keys"
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_path = keys / "audit-ed25519.key"
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        create_private(private_path, pem)
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{private_path} is not an Ed25519 key")
        self._key = key
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pub_path = public_key_path(data_dir)
        if not pub_path.exists() or pub_path.read_bytes() != public:
            pub_path.write_bytes(public)
        _cut_torn_tail(checkpoints_path(data_dir))
        stored = [c for c in read_checkpoints(data_dir) if c is not None]
        self.latest: dict[str, Any] | None = stored[-1] if stored else None

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign_bytes(self, message: bytes) -> bytes:
        """The key's signature of ``message`` (snapshot seals, ``snapshot.py``)."""
        return self._key.sign(message)

    def sign(self, seq: int, head: str, ts: str) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {"seq": seq, "hash": head, "ts": ts}
        signature = self._key.sign(_signed_bytes(checkpoint))
        checkpoint["signature"] = base64.b64encode(signature).decode()
        return checkpoint

    def append(self, seq: int, head: str, ts: str) -> dict[str, Any]:
        """Sign the head and make the checkpoint durable (blocking: call from a thread)."""
        checkpoint = self.sign(seq, head, ts)
        path = checkpoints_path(self.data_dir)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, msgspec.json.encode(checkpoint) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.data_dir)
        self.latest = checkpoint
        return checkpoint


def _cut_torn_tail(path: Path) -> None:
    """Drop an incomplete last line (an append cut short by a crash, never relied on).

    Left in place, the next append would be glued to it and the file would read as
    tampered from then on.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, data.rfind(b"\n") + 1)
            os.fsync(fd)
        finally:
            os.close(fd)
