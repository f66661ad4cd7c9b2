"""Reading stored audit lines by sequence number, for the admin API and the tenants' trails.

Segment names give each segment's first ``seq``; within a segment a sparse index (one
offset every ``STRIDE`` lines, learnt while reading: one byte an entry) lets a read start
at most ``STRIDE - 1`` lines before its first line instead of scanning the segment from
the top. Only lines up to the writer's durable head are returned, and they are returned
as stored, byte for byte. :meth:`AuditReader.read` reads a run of consecutive seqs (a
page of the whole log), :meth:`AuditReader.read_seqs` scattered ones (a tenant's trail).
"""

from __future__ import annotations

import bisect
import contextlib
from pathlib import Path
from typing import BinaryIO

from actors.journal.segments import list_segments

STRIDE = 16


class AuditReader:
    """Pages through the audit segments; safe to call from a worker thread."""

    def __init__(self, audit_dir: Path) -> None:
        self.audit_dir = audit_dir
        # segment path -> sorted list of (seq, offset) of known line starts
        self._index: dict[Path, list[tuple[int, int]]] = {}

    def read(self, after: int, limit: int, upto: int) -> list[bytes]:
        """Up to ``limit`` stored lines with ``after < seq <= upto``, without newlines."""
        first = after + 1
        if first > upto or limit <= 0:
            return []
        segments = list_segments(self.audit_dir)
        starts = [int(p.stem) for p in segments]
        i = max(bisect.bisect_right(starts, first) - 1, 0)
        lines: list[bytes] = []
        for segment, start in zip(segments[i:], starts[i:], strict=True):
            if start > upto or len(lines) >= limit:
                break
            self._read_segment(segment, start, first, min(upto, first + limit - 1), lines)
        return lines

    def read_seqs(self, seqs: list[int], upto: int) -> list[bytes]:
        """The stored lines of ``seqs`` (rising, each <= ``upto``), without newlines.

        Each segment is opened once; each line costs at most ``STRIDE`` lines of reading.
        A seq the log does not hold (it is damaged) is left out.
        """
        wanted = [seq for seq in seqs if 1 <= seq <= upto]
        if not wanted:
            return []
        segments = list_segments(self.audit_dir)
        starts = [int(p.stem) for p in segments]
        lines: list[bytes] = []
        at = 0
        while at < len(wanted):
            i = max(bisect.bisect_right(starts, wanted[at]) - 1, 0)
            following = starts[i + 1] if i + 1 < len(starts) else upto + 1
            end = bisect.bisect_left(wanted, following, at)
            with segments[i].open("rb") as f:
                for seq in wanted[at:end]:
                    self._read_segment(segments[i], starts[i], seq, seq, lines, f)
            at = max(end, at + 1)
        return lines

    def _read_segment(
        self,
        segment: Path,
        start: int,
        first: int,
        last: int,
        out: list[bytes],
        opened: BinaryIO | None = None,
    ) -> None:
        index = self._index.setdefault(segment, [(start, 0)])
        seq, offset = index[max(bisect.bisect_right(index, (first, 1 << 62)) - 1, 0)]
        with contextlib.nullcontext(opened) if opened is not None else segment.open("rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n") or seq > last:
                    return
                if seq % STRIDE == 0 and seq > index[-1][0]:
                    index.append((seq, offset))
                if seq >= first:
                    out.append(line[:-1])
                seq += 1
                offset += len(line)
