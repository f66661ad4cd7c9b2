"""File descriptors: the process's limit raised at start, and the share of connections.

Every connection holds a descriptor, and so do the journal's segment, the snapshot and
checkpoint being written, the fleet's HTTP pool and the log. Connections are the only
ones a stranger can multiply, so they get a budget: the limit, less the descriptors open
when serving starts, less a reserve for everything else that opens files later. Within
that budget, peers can never leave the journal without a descriptor.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

#: where Linux lists the process's open descriptors
FD_DIR = Path("/proc/self/fd")
#: where Linux says how many connections a listen backlog may hold at most
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    """What the descriptor limit leaves for connections."""

    limit: int
    open_at_start: int
    reserved: int

    @property
    def connections(self) -> int:
        return self.limit - self.open_at_start - self.reserved


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (where allowed); the soft after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        target = _nr_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def open_descriptors() -> int:
    """How many descriptors the process has open now."""
    try:
        return len(os.listdir(FD_DIR))
    except OSError:
        # No /proc: count the low descriptors that answer fstat (slow, but only at start).
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return sum(1 for fd in range(min(soft, 65536)) if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def plan(reserved: int) -> DescriptorPlan:
    """The budget of connections once the limit is raised, from what is open now."""
    return DescriptorPlan(raise_open_files_limit(), open_descriptors(), reserved)


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog, where it can be read."""
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return None
