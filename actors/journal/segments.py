"""The segment files of the audit log: their names, their order, reading their lines.

``<data-dir>/audit/NNNNNNNNNNNN.jsonl``, each named by the zero-padded seq of its first
entry; read in lexical order the segments form one chain (API.md). Reading goes a few MiB
at a time: replay and verify loop over whole chunks, never a Python object per line.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

SEGMENT_DIGITS = 12
#: segment bytes read at a time by :func:`iter_chunks`
READ_CHUNK = 4 * 1024 * 1024


def segment_name(first_seq: int) -> str:
    return f"{first_seq:0{SEGMENT_DIGITS}d}.jsonl"


def list_segments(audit_dir: Path) -> list[Path]:
    """Segment files in chain order (lexical order of their zero-padded names)."""
    if not audit_dir.is_dir():
        return []
    return sorted(
        p
        for p in audit_dir.iterdir()
        if p.suffix == ".jsonl" and p.stem.isdigit() and len(p.stem) == SEGMENT_DIGITS
    )


class RawLine(NamedTuple):
    """One line of a segment as stored, with where it lies (a tuple: one per entry read)."""

    segment: Path
    offset: int
    data: bytes  # without the trailing newline
    complete: bool  # False for a last line that has no newline yet


class Chunk(NamedTuple):
    """Complete lines read from one segment in one go; ``offset`` is where the first starts."""

    segment: Path
    offset: int
    lines: list[bytes]  # without their newlines
    torn: bytes  # the segment's unterminated last line (then ``lines`` is empty), else b""


def iter_chunks(audit_dir: Path, start: Path | None = None, offset: int = 0) -> Iterator[Chunk]:
    """Every line of every segment in chain order, a few MiB at a time.

    Replay and verify loop over these lists directly: big reads split in C cost far less
    than a Python object per line.
    """
    segments = list_segments(audit_dir)
    if start is not None:
        segments = [s for s in segments if s >= start]
    for index, segment in enumerate(segments):
        pos = offset if (start is not None and index == 0) else 0
        with segment.open("rb") as f:
            f.seek(pos)
            rest = b""
            while chunk := f.read(READ_CHUNK):
                lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
                rest = lines.pop()
                if lines:
                    yield Chunk(segment, pos, lines, b"")
                    pos += sum(map(len, lines)) + len(lines)
            if rest:
                yield Chunk(segment, pos, [], rest)


def iter_lines(audit_dir: Path, start: Path | None = None, offset: int = 0) -> Iterator[RawLine]:
    """Every line of every segment, in chain order, optionally from a known position."""
    for chunk in iter_chunks(audit_dir, start, offset):
        pos = chunk.offset
        for line in chunk.lines:
            yield RawLine(chunk.segment, pos, line, True)
            pos += len(line) + 1
        if chunk.torn:
            yield RawLine(chunk.segment, pos, chunk.torn, False)


def lines_from(audit_dir: Path, first_seq: int) -> Iterator[bytes]:
    """The complete stored lines (without newlines) from seq ``first_seq`` on, in order.

    Only the segment that holds ``first_seq`` (by the segments' names) is read from its
    top; an unterminated last line is not yielded. Assumes the log is a chain (each
    segment starts where its name says): the tree and the trail index are derived from
    a log that the start-up and the background check verify.
    """
    segments = list_segments(audit_dir)
    if not segments:
        return
    starts = [int(p.stem) for p in segments]
    at = max(bisect.bisect_right(starts, first_seq) - 1, 0)
    skip = max(first_seq - starts[at], 0)
    for chunk in iter_chunks(audit_dir, segments[at]):
        lines = chunk.lines
        if skip:
            if skip >= len(lines):
                skip -= len(lines)
                continue
            lines, skip = lines[skip:], 0
        yield from lines
