"""Reading stored audit lines by sequence number, for the admin API.

Segment names give each segment's first ``seq``; within a segment a sparse index (one
offset every ``STRIDE`` lines, learnt while reading) lets a page start close to its first
line instead of scanning the segment from the top. Only lines up to the writer's durable
head are returned, and they are returned as stored, byte for byte.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from actors.journal.segments import list_segments

STRIDE = 256


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

    def _read_segment(
        self, segment: Path, start: int, first: int, last: int, out: list[bytes]
    ) -> None:
        index = self._index.setdefault(segment, [(start, 0)])
        seq, offset = index[max(bisect.bisect_right(index, (first, 1 << 62)) - 1, 0)]
        with segment.open("rb") as f:
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
