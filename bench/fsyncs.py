"""Counting the proxy's fsyncs per acknowledged write, from outside the process.

The main figure now comes from the proxy's own counters (``bench/metrics.py``, its
``/metrics`` listener); two external sources stay as cross-checks, each read per
measured window ``[start, end]``:

* **strace** (:func:`sync_times`): the server runs under
  ``strace -f --seccomp-bpf -ttt -T -e trace=fsync,fdatasync,syncfs,sync``; every line
  that starts such a call carries its wall-clock time (and, once finished, how long it
  took). This counts *every* sync of the process: audit batches, new segments'
  directory, checkpoints, snapshots.

The audit log itself no longer shows group commits: every entry carries the time it
was drafted (the decision's time), not the time of the batch that made it durable, so
batches are counted by the proxy's own counters only. Results of earlier runs still
carry the log-derived ``audit_batches`` column, and ``bench/report.py`` still renders it.

Acknowledged writes come from wrk (``writes_acked``: 201 answers and 200 answers of a
destroy). strace needs the time windows only, so it adds nothing to the hot path.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path

_SYNC_LINE = re.compile(r"^(?:\d+\s+)?(\d+\.\d+)\s+(?:fsync|fdatasync|syncfs|sync)\(")
_FINISHED = re.compile(
    r"^(?:\d+\s+)?(\d+\.\d+)\s+(?:(?:fsync|fdatasync|syncfs|sync)\(|<\.\.\. \w+ resumed>)"
    r".*<(\d+\.\d+)>\s*$"
)


def sync_times(trace_path: Path) -> list[float]:
    """Sorted start times of the sync calls in an ``strace -ttt -o`` file."""
    times = []
    with trace_path.open(errors="replace") as lines:
        for line in lines:
            match = _SYNC_LINE.match(line)
            if match:
                times.append(float(match.group(1)))
    times.sort()
    return times


def sync_durations(trace_path: Path) -> list[tuple[float, float]]:
    """(time, seconds) of every finished sync call (``strace -T`` appends ``<seconds>``).

    A call interrupted in the file by another thread's line finishes on a ``<... fsync
    resumed>`` line; its time is then that line's (the call's end), close enough here.
    """
    found = []
    with trace_path.open(errors="replace") as lines:
        for line in lines:
            match = _FINISHED.match(line)
            if match:
                found.append((float(match.group(1)), float(match.group(2))))
    return found


def mean_duration_in(durations: list[tuple[float, float]], start: float, end: float) -> float:
    inside = [seconds for at, seconds in durations if start <= at < end]
    return sum(inside) / len(inside) if inside else 0.0


def count_in(times: list[float], start: float, end: float) -> int:
    """How many of the sorted ``times`` fall in ``[start, end)``."""
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)
