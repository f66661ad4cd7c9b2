"""C2SP signed notes, checkpoints and cosignatures.

The keys, texts and signatures of ``golang.org/x/mod/sumdb/note`` (its documentation and
``note_test.go``, BSD-licensed) are the independent reference: no Python implementation of
signed notes exists to compare with, and Ed25519 is deterministic, so a note we sign with
the Go example's key must equal the Go example byte for byte, and the Go example must
verify with our parser.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.journal.note import (
    COSIGNATURE_V1,
    ED25519,
    Checkpoint,
    InvalidSignature,
    MalformedNote,
    NoteError,
    Signer,
    UnverifiedNote,
    Verifier,
    cosign,
    cosignature_time,
    open_checkpoint,
    open_note,
    parse_note,
    sign_checkpoint,
    sign_note,
)

# golang.org/x/mod/sumdb/note: the documented example and note_test.go
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdn"
    "gotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnW"
    "Lox33WWd1RvMc+QQ=\n"
)


def test_the_go_example_signs_byte_for_byte() -> None:
    signer = Signer.parse(PETER_SKEY)
    assert str(signer.verifier) == PETER_VKEY
    assert signer.private_key_string() == PETER_SKEY
    assert sign_note(TEXT, [signer]) == TEXT + "\n" + PETER_SIG
    assert PETER_SKEY not in repr(signer)


def test_the_go_example_verifies() -> None:
    peter, enoch = Verifier.parse(PETER_VKEY), Verifier.parse(ENOCH_VKEY)
    assert str(peter) == PETER_VKEY and str(enoch) == ENOCH_VKEY
    assert (peter.name, peter.key_id, peter.key_type) == ("PeterNeumann", 0xC74F20A3, ED25519)

    note = open_note((TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode(), [peter])
    assert note.text == TEXT
    assert [s.name for s in note.signatures] == ["PeterNeumann"]
    assert [s.name for s in note.unverified] == ["EnochRoot"]

    both = open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [peter, enoch])
    assert [s.name for s in both.signatures] == ["PeterNeumann", "EnochRoot"]
    assert both.render() == TEXT + "\n" + PETER_SIG + ENOCH_SIG

    with pytest.raises(UnverifiedNote):
        open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])
    # the same key given twice is no ambiguity; a repeated signature counts once
    twice = open_note(TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG, [peter, peter])
    assert len(twice.signatures) == 1 and len(twice.unverified) == 1


def test_a_known_key_whose_signature_fails_rejects_the_note() -> None:
    peter = Verifier.parse(PETER_VKEY)
    broken = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(InvalidSignature, match="PeterNeumann\\+c74f20a3"):
        open_note(broken, [peter])
    with pytest.raises(InvalidSignature):
        open_note(TEXT.replace("cryptography", "cryptographY") + "\n" + PETER_SIG, [peter])
    # an unknown key's broken signature is ignored, as the spec says
    note = open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:], [peter])
    assert len(note.signatures) == 1


@pytest.mark.parametrize(
    "message",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT
        + "\n"
        + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSN"
        "XgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * 101,
        TEXT + "\n" + "\u2014 PeterNeumann AAAA\n",  # shorter than a key ID and a byte
        TEXT + "\n" + PETER_SIG.replace("AM=", "AM"),  # unpadded base64
        TEXT + "\n" + PETER_SIG.replace("\u2014 ", "- "),
    ],
)
def test_malformed_notes_are_refused(message: str) -> None:
    with pytest.raises(MalformedNote):
        open_note(message, [Verifier.parse(PETER_VKEY)])


def test_invalid_utf8_and_oversized_notes_are_refused() -> None:
    with pytest.raises(MalformedNote):
        parse_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode())
    with pytest.raises(MalformedNote):
        parse_note("\ud800" + TEXT + "\n" + PETER_SIG)
    with pytest.raises(MalformedNote):
        parse_note(("x" * 70_000 + "\n\n" + PETER_SIG).encode())


def test_mangled_verifier_keys_are_refused() -> None:
    # note_test.go TestNewVerifier: every proper substring, every byte bumped by one
    raw = PETER_VKEY.encode()
    for i in range(len(raw) + 1):
        for j in range(i + 1, len(raw) + 1):
            if (i, j) != (0, len(raw)):
                with pytest.raises(MalformedNote):
                    Verifier.parse(raw[i:j].decode())
    for i in range(len(raw)):
        bumped = bytearray(raw)
        bumped[i] += 1
        with pytest.raises(MalformedNote):
            Verifier.parse(bumped.decode())
    for bad in (
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+-c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ):
        with pytest.raises(MalformedNote):
            Verifier.parse(bad)


def test_mangled_signer_keys_are_refused() -> None:
    raw = PETER_SKEY.encode()
    for i in range(len(raw) + 1):
        for j in range(i + 1, len(raw) + 1):
            if (i, j) != (0, len(raw)):
                with pytest.raises(MalformedNote):
                    Signer.parse(raw[i:j].decode())
    for i in range(len(raw)):
        bumped = bytearray(raw)
        bumped[i] += 1
        with pytest.raises(MalformedNote):
            Signer.parse(bumped.decode())


def test_key_id_is_the_spec_hash() -> None:
    signer = Signer.generate("vm-tenant/abc123")
    v = signer.verifier
    digest = hashlib.sha256(b"vm-tenant/abc123\n\x01" + v.public).digest()
    assert v.key_id == int.from_bytes(digest[:4], "big")
    encoded = base64.b64encode(b"\x01" + v.public).decode()
    assert str(v) == f"vm-tenant/abc123+{digest[:4].hex()}+{encoded}"
    assert Verifier.parse(str(v)) == v


# --- checkpoints -----------------------------------------------------------------------


ROOT = hashlib.sha256(b"some tree").digest()


def test_checkpoint_text_and_signature_line() -> None:
    signer = Signer.generate("vm-tenant/0f3c")
    checkpoint = Checkpoint("vm-tenant/0f3c", 20852163, ROOT)
    text = f"vm-tenant/0f3c\n20852163\n{base64.b64encode(ROOT).decode()}\n"
    assert checkpoint.text() == text
    note = sign_checkpoint(checkpoint, signer)
    body, _, line = note.partition("\n\n")
    assert body + "\n" == text
    assert line.startswith("\u2014 vm-tenant/0f3c ") and line.endswith("\n")
    blob = base64.b64decode(line.split(" ")[2])
    assert blob[:4] == signer.verifier.key_id.to_bytes(4, "big")
    # an independent check of the Ed25519 signature over exactly the text
    Ed25519PublicKey.from_public_bytes(signer.verifier.public).verify(blob[4:], text.encode())

    opened, _ = open_checkpoint(note.encode(), signer.verifier)
    assert opened == checkpoint
    with pytest.raises(UnverifiedNote):
        open_checkpoint(note, Signer.generate("vm-tenant/0f3c").verifier)
    with pytest.raises(ValueError):
        sign_checkpoint(Checkpoint("someone-else", 1, ROOT), signer)


def test_checkpoint_of_another_origin_signed_by_the_log_key_is_refused() -> None:
    signer = Signer.generate("vm-tenant/a")
    note = sign_note(Checkpoint("vm-tenant/b", 3, ROOT).text(), [signer])
    with pytest.raises(MalformedNote, match="origin"):
        open_checkpoint(note, signer.verifier)


@pytest.mark.parametrize(
    "text",
    [
        "origin\n12\n",
        "origin\n012\n{root}\n",
        "origin\n-1\n{root}\n",
        "origin\n+1\n{root}\n",
        "origin\n1 \n{root}\n",
        "origin\n9223372036854775808\n{root}\n",
        "\n12\n{root}\n",
        "origin\n12\n{root}",
        "origin\n12\n{root}\n\n",
        "origin\n12\n{short}\n",
        "origin\n12\n{root_unpadded}\n",
        "origin\n12\n{root}\nextension\n\n",
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    encoded = base64.b64encode(ROOT).decode()
    text = text.format(
        root=encoded, short=base64.b64encode(ROOT[:31]).decode(), root_unpadded=encoded[:-1]
    )
    with pytest.raises(MalformedNote):
        Checkpoint.from_text(text)


def test_checkpoint_extremes() -> None:
    assert Checkpoint.from_text(Checkpoint("o", 0, ROOT).text()).size == 0
    big = Checkpoint("o", (1 << 63) - 1, ROOT, ("ext one",))
    assert Checkpoint.from_text(big.text()) == big


# --- cosignatures ----------------------------------------------------------------------


def test_cosignature_signs_the_spec_message_and_verifies() -> None:
    log = Signer.generate("vm-tenant/log")
    witness = Signer.generate("witness.example/w1", COSIGNATURE_V1)
    checkpoint = Checkpoint("vm-tenant/log", 5, ROOT)
    _, note = open_checkpoint(sign_checkpoint(checkpoint, log), log.verifier)

    cosigned = cosign(note, witness, timestamp=1679315147)
    rendered = cosigned.render()
    signature = cosigned.signatures[-1]
    assert signature.name == "witness.example/w1"
    assert cosignature_time(signature) == 1679315147
    # the key ID uses type 0x04; the signed message is the one the spec spells out
    digest = hashlib.sha256(b"witness.example/w1\n\x04" + witness.verifier.public).digest()
    assert signature.key_id == int.from_bytes(digest[:4], "big")
    message = b"cosignature/v1\ntime 1679315147\n" + checkpoint.text().encode()
    Ed25519PublicKey.from_public_bytes(witness.verifier.public).verify(
        signature.signature[8:], message
    )
    assert signature.signature[:8] == (1679315147).to_bytes(8, "big")

    # the log's key still verifies the note; the witness key verifies its cosignature
    assert open_checkpoint(rendered, log.verifier)[0] == checkpoint
    both = open_note(rendered, [log.verifier, witness.verifier])
    assert len(both.signatures) == 2
    vkey = str(witness.verifier)
    assert Verifier.parse(vkey) == witness.verifier
    # cosigning again replaces the witness's own earlier line
    again = cosign(both, witness, timestamp=1679315200)
    assert len(again.signatures) == 2
    assert cosignature_time(again.signatures[-1]) == 1679315200

    forged = rendered.replace("\n5\n", "\n6\n")
    with pytest.raises(InvalidSignature):
        open_note(forged, [witness.verifier])
    with pytest.raises(ValueError):
        cosign(note, log)


# --- properties ------------------------------------------------------------------------

_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), min_codepoint=0x20), max_size=30
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_line, min_size=1, max_size=6))
def test_any_text_signs_and_opens_again(lines: list[str]) -> None:
    signer = Signer.parse(PETER_SKEY)
    text = "".join(f"{line}\n" for line in lines)
    note = sign_note(text, [signer])
    assert open_note(note.encode(), [signer.verifier]).text == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 10_000))
def test_hostile_bytes_are_only_ever_a_note_error(junk: bytes, at: int) -> None:
    genuine = (TEXT + "\n" + PETER_SIG).encode()
    at %= len(genuine)
    for candidate in (junk, genuine[:at] + junk + genuine[at:]):
        with contextlib.suppress(NoteError):
            open_note(candidate, [Verifier.parse(PETER_VKEY)])
