"""C2SP signed notes, tlog checkpoints and tlog cosignatures, with Ed25519 keys.

A signed note (c2sp.org/signed-note) is a UTF-8 text ending in a newline, a blank line,
and signature lines ``— <key name> base64(key ID || signature)``; the key ID of an
Ed25519 key is ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``. Keys travel as the
Go ``note`` strings: ``<name>+<key ID as 8 hex digits>+<base64(type || public key)>`` for a
verifier, ``PRIVATE+KEY+<name>+<key ID>+<base64(type || seed)>`` for a signer.

A checkpoint (c2sp.org/tlog-checkpoint) is a note whose text is the origin line, the
tree size in decimal and the base64 root hash, each ending in a newline; the log signs it
with a key named after the origin. A witness adds a cosignature (c2sp.org/tlog-cosignature,
signature type 0x04): its own Ed25519 key signs ``cosignature/v1``, ``time <seconds>``
and the checkpoint text, and the signature carries that time in front.

Parsing is strict and follows the Go implementation (``golang.org/x/mod/sumdb/note``):
anything malformed is refused as a whole. Verification follows the spec: signatures by
keys the caller does not know are ignored, a known key's signature must verify, and at
least one must. The errors, by cause::

    NoteError                  nothing about the note can be trusted
    ├── MalformedNote          the bytes do not follow the format (also a key string)
    ├── UnverifiedNote         no signature by a key the caller knows
    └── InvalidSignature       a known key's signature does not verify
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: signature types of c2sp.org/signed-note
ED25519 = 0x01
COSIGNATURE_V1 = 0x04
#: the Go implementation refuses more; the spec asks to accept at least 16
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 64 * 1024
SIGNATURE_PREFIX = "\u2014 "  # EM DASH, SPACE
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_COSIGN_HEADER = "cosignature/v1\n"


class NoteError(Exception):
    """A note, key or checkpoint that must not be trusted."""


class MalformedNote(NoteError, ValueError):
    """The bytes do not follow the signed-note, checkpoint or key format."""


class UnverifiedNote(NoteError):
    """No signature on the note is by a key the caller knows."""


class InvalidSignature(NoteError):
    """A signature by a known key does not verify."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    """Strict standard base64 with padding; refuses any other spelling of the same bytes."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedNote(f"{what} is not base64") from None
    if _b64(data) != text:
        raise MalformedNote(f"{what} is not canonical base64")
    return data


def valid_name(name: str) -> bool:
    """A key name: non-empty, no Unicode space, no ``+`` (and no control character)."""
    return bool(name) and "+" not in name and not any(c.isspace() or ord(c) < 0x20 for c in name)


def key_id(name: str, key_type: int, public: bytes) -> int:
    """``SHA-256(name || 0x0A || type || public key)[:4]`` as a big-endian integer."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class Verifier:
    """A public key that checks note signatures (Ed25519, or a type-0x04 cosigner)."""

    name: str
    key_id: int
    key_type: int
    public: bytes

    @classmethod
    def from_public(
        cls, name: str, key: Ed25519PublicKey | bytes, key_type: int = ED25519
    ) -> Verifier:
        raw = key if isinstance(key, bytes) else _raw_public(key)
        if not valid_name(name):
            raise MalformedNote(f"invalid key name {name!r}")
        if key_type not in (ED25519, COSIGNATURE_V1) or len(raw) != 32:
            raise MalformedNote("not an Ed25519 public key")
        return cls(name, key_id(name, key_type, raw), key_type, raw)

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """A verifier key string ``<name>+<8 hex>+<base64(type || key)>``."""
        parts = vkey.split("+", 2)
        if len(parts) != 3 or not _HEX8.fullmatch(parts[1]) or not valid_name(parts[0]):
            raise MalformedNote("malformed verifier key")
        name, id_hex, material = parts
        key = _unb64(material, "verifier key")
        if len(key) != 33 or key[0] not in (ED25519, COSIGNATURE_V1):
            raise MalformedNote("verifier key is not an Ed25519 key")
        verifier = cls(name, int(id_hex, 16), key[0], key[1:])
        if key_id(name, key[0], key[1:]) != verifier.key_id:
            raise MalformedNote("verifier key ID does not match the key")
        return verifier

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id:08x}+{_b64(bytes([self.key_type]) + self.public)}"

    def verify(self, text: str, signature: bytes) -> bool:
        """Whether ``signature`` (without its key ID) signs ``text`` with this key."""
        if self.key_type == COSIGNATURE_V1:
            if len(signature) != 8 + 64:
                return False
            stamp = int.from_bytes(signature[:8], "big")
            if stamp >= 1 << 63:
                return False
            message, signature = _cosigned_message(text, stamp), signature[8:]
        else:
            message = text.encode()
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except (_CryptoInvalidSignature, ValueError):
            return False
        return True


def _cosigned_message(text: str, timestamp: int) -> bytes:
    return f"{_COSIGN_HEADER}time {timestamp}\n{text}".encode()


def cosignature_time(signature: Signature) -> int:
    """The POSIX time a tlog-cosignature/v1 signature says it was made at."""
    return int.from_bytes(signature.signature[:8], "big")


class Signer:
    """An Ed25519 private key with its name: signs notes (type 0x01) or cosigns (0x04)."""

    def __init__(self, name: str, key: Ed25519PrivateKey, key_type: int = ED25519) -> None:
        self._key = key
        self.verifier = Verifier.from_public(name, key.public_key(), key_type)

    @classmethod
    def generate(cls, name: str, key_type: int = ED25519) -> Signer:
        return cls(name, Ed25519PrivateKey.generate(), key_type)

    @classmethod
    def parse(cls, skey: str) -> Signer:
        """A signer key string ``PRIVATE+KEY+<name>+<8 hex>+<base64(type || seed)>``."""
        parts = skey.split("+", 4)
        if (
            len(parts) != 5
            or parts[:2] != ["PRIVATE", "KEY"]
            or not _HEX8.fullmatch(parts[3])
            or not valid_name(parts[2])
        ):
            raise MalformedNote("malformed signer key")
        key = _unb64(parts[4], "signer key")
        if len(key) != 33 or key[0] not in (ED25519, COSIGNATURE_V1):
            raise MalformedNote("signer key is not an Ed25519 key")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(key[1:]), key[0])
        if signer.verifier.key_id != int(parts[3], 16):
            raise MalformedNote("signer key ID does not match the key")
        return signer

    @property
    def name(self) -> str:
        return self.verifier.name

    def private_key_string(self) -> str:
        """The Go ``note`` signer string; a secret: store it as one (mode 0600)."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        v = self.verifier
        return f"PRIVATE+KEY+{v.name}+{v.key_id:08x}+{_b64(bytes([v.key_type]) + seed)}"

    def sign(self, text: str, *, timestamp: int | None = None) -> Signature:
        """The signature line of ``text`` (a cosigner stamps it with ``timestamp`` or now)."""
        v = self.verifier
        if v.key_type == COSIGNATURE_V1:
            stamp = int(time.time()) if timestamp is None else timestamp
            if not 0 <= stamp < 1 << 63:
                raise ValueError("cosignature time out of range")
            blob = stamp.to_bytes(8, "big") + self._key.sign(_cosigned_message(text, stamp))
        else:
            blob = self._key.sign(text.encode())
        return Signature(v.name, v.key_id, blob)

    def __repr__(self) -> str:  # never the private key
        return f"Signer({self.verifier})"


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: key name, key ID and the signature bytes after the ID."""

    name: str
    key_id: int
    signature: bytes

    def line(self) -> str:
        blob = self.key_id.to_bytes(4, "big") + self.signature
        return f"{SIGNATURE_PREFIX}{self.name} {_b64(blob)}\n"


@dataclass(frozen=True, slots=True)
class Note:
    """A note's text and its signatures, in order, each distinct one once.

    After :func:`open_note`, ``signatures`` are the ones that verified and
    ``unverified`` those by keys the caller does not know.
    """

    text: str
    signatures: tuple[Signature, ...]
    unverified: tuple[Signature, ...] = field(default=())

    def render(self) -> str:
        """The note as sent: text, blank line, every signature line."""
        lines = "".join(s.line() for s in (*self.signatures, *self.unverified))
        return f"{self.text}\n{lines}"


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNote("note text must end with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise MalformedNote("note contains a control character")


def sign_note(text: str, signers: Iterable[Signer]) -> str:
    """The signed note of ``text``, one signature line per signer."""
    _check_text(text)
    signatures = tuple(signer.sign(text) for signer in signers)
    if not signatures:
        raise ValueError("a signed note needs at least one signer")
    return Note(text, signatures).render()


def parse_note(data: bytes | str) -> Note:
    """The text and signatures of a note, checked for syntax only (nothing verified)."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedNote("note is not UTF-8") from None
    if len(data) > MAX_NOTE_BYTES:
        raise MalformedNote("note too large")
    try:
        text_all = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedNote("note is not UTF-8") from None
    return _parse_text(text_all)


def _parse_text(data: str) -> Note:
    if any(ord(c) < 0x20 and c != "\n" for c in data):
        raise MalformedNote("note contains a control character")
    split = data.rfind("\n\n")
    if split < 0:
        raise MalformedNote("note has no signature block")
    text, block = data[: split + 1], data[split + 2 :]
    if not block.endswith("\n"):
        raise MalformedNote("signature block must end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote("too many signatures")
    signatures: list[Signature] = []
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise MalformedNote("unexpected line in the signature block")
        name, space, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if not space or not valid_name(name):
            raise MalformedNote("malformed signature line")
        blob = _unb64(encoded, "signature")
        if len(blob) < 5:
            raise MalformedNote("signature too short")
        signature = Signature(name, int.from_bytes(blob[:4], "big"), blob[4:])
        if signature not in signatures:
            signatures.append(signature)
    return Note(text, tuple(signatures))


def open_note(data: bytes | str, verifiers: Sequence[Verifier]) -> Note:
    """Parse and verify a note against the keys the caller trusts.

    Raises :class:`MalformedNote`, :class:`InvalidSignature` (a known key's signature
    fails) or :class:`UnverifiedNote` (no known key signed it).
    """
    note = parse_note(data)
    known: dict[tuple[str, int], list[Verifier]] = {}
    for verifier in verifiers:
        known.setdefault((verifier.name, verifier.key_id), []).append(verifier)
    verified: list[Signature] = []
    unverified: list[Signature] = []
    for signature in note.signatures:
        candidates = known.get((signature.name, signature.key_id))
        if not candidates:
            unverified.append(signature)
            continue
        if len({str(v) for v in candidates}) > 1:
            raise InvalidSignature(f"ambiguous key {signature.name}+{signature.key_id:08x}")
        if not candidates[0].verify(note.text, signature.signature):
            raise InvalidSignature(
                f"invalid signature for key {signature.name}+{signature.key_id:08x}"
            )
        verified.append(signature)
    if not verified:
        raise UnverifiedNote("note has no verifiable signatures")
    return Note(note.text, tuple(verified), tuple(unverified))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head in the c2sp.org/tlog-checkpoint text form."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), _b64(self.root), *self.extensions]
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint text strictly (three lines at least, each non-empty)."""
        _check_text(text)
        lines = text[:-1].split("\n")
        if len(lines) < 3 or not all(lines):
            raise MalformedNote("a checkpoint has an origin, a size and a root, each non-empty")
        origin, size, root, *extensions = lines
        if not _DECIMAL.fullmatch(size) or int(size) >= 1 << 63:
            raise MalformedNote("checkpoint size is not a decimal number without leading zeros")
        digest = _unb64(root, "checkpoint root")
        if len(digest) != 32:
            raise MalformedNote("checkpoint root is not a SHA-256 hash")
        return cls(origin, int(size), digest, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    """The checkpoint as a note signed by the log's key, which is named after the origin."""
    if signer.name != checkpoint.origin:
        raise ValueError("the log's key must be named after the checkpoint's origin")
    return sign_note(checkpoint.text(), [signer])


def open_checkpoint(data: bytes | str, log_key: Verifier) -> tuple[Checkpoint, Note]:
    """Verify a checkpoint note with the log's key and parse its text."""
    note = open_note(data, [log_key])
    checkpoint = Checkpoint.from_text(note.text)
    if checkpoint.origin != log_key.name:
        raise MalformedNote(
            f"checkpoint origin {checkpoint.origin!r} is not the log key's name {log_key.name!r}"
        )
    return checkpoint, note


def cosign(note: Note, cosigner: Signer, *, timestamp: int | None = None) -> Note:
    """``note`` with a tlog-cosignature/v1 line by ``cosigner`` added (replacing its own)."""
    if cosigner.verifier.key_type != COSIGNATURE_V1:
        raise ValueError("a cosigner key has signature type 0x04")
    mine = (cosigner.name, cosigner.verifier.key_id)
    keep = tuple(s for s in note.signatures if (s.name, s.key_id) != mine)
    rest = tuple(s for s in note.unverified if (s.name, s.key_id) != mine)
    return Note(note.text, (*keep, cosigner.sign(note.text, timestamp=timestamp)), rest)
