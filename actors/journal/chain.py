"""The audit chain's format: canonical bytes, entry hashes, verification.

Pure functions over bytes, shared by the writer, the start-up replay and the
offline ``vm-tenant audit verify``. The canonical form is the one API.md fixes (sorted
keys, no insignificant whitespace, non-ASCII kept as UTF-8). orjson with sorted keys
produces exactly those bytes for every audit entry and is the fastest encoder here (replay
and verify encode every entry once); what it refuses (integers beyond 64 bits, lone
surrogates, deep nesting) goes to msgspec's sorted encoder, the form this log always had.
``tests/test_chain.py`` checks both against the standard library.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson

from actors.journal.segments import RawLine

GENESIS = "0" * 64
_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(dict)
_SORTED = orjson.OPT_SORT_KEYS
_sha256 = hashlib.sha256


def canonical(entry: dict[str, Any]) -> bytes:
    """The canonical JSON bytes of ``entry`` (sorted keys, compact, UTF-8)."""
    try:
        return orjson.dumps(entry, option=_SORTED)
    except orjson.JSONEncodeError:
        return _encoder.encode(entry)


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 over the canonical form of ``entry`` without its ``hash`` member."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(entry: dict[str, Any]) -> bytes:
    """Add ``hash`` to ``entry`` (which must not have one yet) and return its stored line."""
    digest = hashlib.sha256(canonical(entry)).hexdigest()
    entry["hash"] = digest
    return canonical(entry) + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """Parse one stored line; raises ``msgspec.DecodeError`` when it is not a JSON object."""
    return _decoder.decode(line)


Verdict = Literal["ok", "torn", "tampered", "truncated"]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What a verification found: ``verdict``, how far it got, and the first bad ``seq``."""

    verdict: Verdict
    entries: int
    head_seq: int
    head_hash: str
    bad_seq: int | None = None
    reason: str = ""

    @property
    def intact(self) -> bool:
        return self.verdict in ("ok", "torn")


class ChainBroken(Exception):
    """A chain failed verification; ``report`` says where and why."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(f"audit chain {report.verdict} at seq {report.bad_seq}: {report.reason}")
        self.report = report


class ChainVerifier:
    """Checks entries one by one against the running head of the chain.

    Feed it every line in order with :meth:`check`; it raises :class:`ChainBroken` on the
    first entry that does not link, does not hash, or does not parse.
    """

    def __init__(self, seq: int = 0, head: str = GENESIS) -> None:
        self.seq = seq
        self.head = head
        self.entries = 0

    def report(
        self, verdict: Verdict = "ok", bad: int | None = None, why: str = ""
    ) -> VerifyReport:
        return VerifyReport(verdict, self.entries, self.seq, self.head, bad, why)

    def check(self, data: bytes) -> dict[str, Any]:
        expected = self.seq + 1
        try:
            entry = _decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise ChainBroken(
                self.report("tampered", expected, "line is not a JSON object")
            ) from None
        # pop rather than copy: this runs once per entry on every start and verify
        stored = entry.pop("hash", None)
        seq = entry.get("seq")
        if type(stored) is not str:
            raise ChainBroken(self.report("tampered", expected, "entry has no hash"))
        if type(seq) is not int or seq != expected:
            why = f"expected seq {expected}, found {seq!r}"
            raise ChainBroken(self.report("tampered", expected, why))
        if entry.get("prev") != self.head:
            raise ChainBroken(self.report("tampered", seq, "prev does not match the previous hash"))
        digest = _sha256(canonical(entry)).hexdigest()
        entry["hash"] = stored
        if stored != digest:
            raise ChainBroken(self.report("tampered", seq, "hash does not match the entry"))
        self.seq, self.head = seq, stored
        self.entries += 1
        return entry


def verify_lines(lines: Iterator[RawLine], verifier: ChainVerifier | None = None) -> VerifyReport:
    """Verify a run of stored lines; a missing newline on the very last line is *torn*."""
    verifier = verifier or ChainVerifier()
    pending: RawLine | None = None
    try:
        for line in lines:
            if pending is not None:
                # An unterminated line followed by more data was not a write in progress.
                raise ChainBroken(
                    verifier.report("tampered", verifier.seq + 1, "line without newline")
                )
            if not line.complete:
                pending = line
                continue
            verifier.check(line.data)
    except ChainBroken as broken:
        return broken.report
    if pending is not None:
        return verifier.report("torn", verifier.seq + 1, "last line is incomplete")
    return verifier.report()
