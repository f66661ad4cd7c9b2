"""Signed checkpoints of the audit log's head: the chain's and the Merkle tree's.

A hash chain alone cannot show that its newest entries were deleted, or that the whole
log was rewritten with fresh hashes. So the proxy signs its durable head with an Ed25519
key of its own, in two forms at once (:class:`SignedHead`):

- the v1 checkpoint ``{seq, hash, ts, signature}`` of the chain (``signature`` over the
  canonical JSON of ``{seq, hash, ts}``), and
- a C2SP tlog-checkpoint signed note of the tree (origin, size = ``seq``, RFC 9162 root):
  what a witness or a tenant checks proofs against (``actors/journal/note.py``).

Periodically and on shutdown the head is appended to ``<data-dir>/audit-checkpoints.jsonl``
(one JSON object a line, with ``size``, ``root`` and ``note`` besides the v1 members); on
demand it is signed without being stored. The private key lives in
``<data-dir>/keys/audit-ed25519.key`` (0600, PEM), its public key is exported beside it as
``audit-ed25519.pub``, and the log's name, its *origin* ``vm-tenant/<16 hex>``, in
``keys/audit-origin``: key and origin are created once and never rewritten, so the log
keeps one identity for its lifetime. ``keys/audit-note.vkey`` exports the verifier key
string (``GET /v1/audit/key``) for an operator to hand out. The same key seals snapshots
(``actors/journal/snapshot.py``), with a context of their own in what it signs.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from actors.fsutil import atomic_write, create_private, fsync_dir
from actors.journal import note
from actors.journal.chain import canonical
from actors.journal.note import Signer, Verifier

ORIGIN_PREFIX = "vm-tenant/"


class SignedHead(msgspec.Struct, frozen=True):
    """The log's head signed in both forms (see the module docstring).

    ``seq`` is also the tree's size; ``root`` is its RFC 9162 root in base64, ``note``
    the signed C2SP checkpoint of ``(origin, seq, root)``.
    """

    seq: int
    hash: str
    ts: str
    signature: str
    root: str
    note: str

    def stored(self) -> dict[str, Any]:
        """The line of ``audit-checkpoints.jsonl``: the v1 members, ``size``, ``root``, ``note``."""
        return {
            "seq": self.seq,
            "hash": self.hash,
            "ts": self.ts,
            "signature": self.signature,
            "size": self.seq,
            "root": self.root,
            "note": self.note,
        }


def sign_head(
    log_signer: Signer, key: Ed25519PrivateKey, seq: int, head: str, ts: str, root: bytes
) -> SignedHead:
    """The head ``seq``/``head`` (at ``ts``) of a log whose tree of ``seq`` leaves has
    ``root``, signed in both forms with ``key``; ``log_signer`` is the same key named after
    the log's origin (``Signer(origin, key)``). Any store signs its heads with this."""
    v1 = {"seq": seq, "hash": head, "ts": ts}
    signature = base64.b64encode(key.sign(_signed_bytes(v1))).decode()
    tree = note.sign_checkpoint(note.Checkpoint(log_signer.name, seq, root), log_signer)
    return SignedHead(seq, head, ts, signature, base64.b64encode(root).decode(), tree)


def checkpoints_path(data_dir: Path) -> Path:
    return data_dir / "audit-checkpoints.jsonl"


def public_key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "audit-ed25519.pub"


def origin_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "audit-origin"


def vkey_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "audit-note.vkey"


def read_origin(data_dir: Path) -> str:
    """The log's origin as stored in the data dir; ``ValueError`` when it is not one."""
    origin = origin_path(data_dir).read_text("utf-8").removesuffix("\n")
    if not origin.startswith(ORIGIN_PREFIX) or len(origin) > 256 or "\n" in origin:
        raise ValueError(f"{origin_path(data_dir)} does not hold a log origin")
    Verifier.from_public(origin, bytes(32))  # a valid key name, or MalformedNote
    return origin


def log_verifier(data_dir: Path, public_key: Path | None = None) -> Verifier:
    """The log's note verifier: its origin and the checkpoint public key (PEM), by default
    both as stored in the data dir."""
    return Verifier.from_public(
        read_origin(data_dir), load_public_key(public_key or public_key_path(data_dir))
    )


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
    """The log's key and origin: signs heads and appends them, durably, to the checkpoint
    file. Creating it creates the key and the origin if the data dir has none yet."""

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
        create_private(origin_path(data_dir), f"{ORIGIN_PREFIX}{secrets.token_hex(8)}\n".encode())
        #: the same key, named after the log's origin: it signs the checkpoint notes
        self.note_signer = Signer(read_origin(data_dir), key)
        vkey = f"{self.note_signer.verifier}\n".encode()
        vkey_file = vkey_path(data_dir)
        if not vkey_file.exists() or vkey_file.read_bytes() != vkey:
            atomic_write(vkey_file, vkey, mode=0o644)
        _cut_torn_tail(checkpoints_path(data_dir))
        stored = [c for c in read_checkpoints(data_dir) if c is not None]
        self.latest: dict[str, Any] | None = stored[-1] if stored else None

    @property
    def verifier(self) -> Verifier:
        """The log's verifier key (``GET /v1/audit/key``)."""
        return self.note_signer.verifier

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign_bytes(self, message: bytes) -> bytes:
        """The key's signature of ``message`` (snapshot seals, ``snapshot.py``)."""
        return self._key.sign(message)

    def sign(self, seq: int, head: str, ts: str, root: bytes) -> SignedHead:
        """Sign the head ``seq``/``head`` of a log whose tree of ``seq`` leaves has ``root``."""
        return sign_head(self.note_signer, self._key, seq, head, ts, root)

    def append(self, head: SignedHead) -> None:
        """Make a signed head durable in the checkpoint file (blocking: call from a thread)."""
        path = checkpoints_path(self.data_dir)
        created = not path.exists()
        stored = head.stored()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, msgspec.json.encode(stored) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.data_dir)
        self.latest = stored


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
