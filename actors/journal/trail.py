"""Each tenant's own audit entries: an index tenant -> seqs, for ``GET /v1/audit``.

A tenant's trail is every entry whose ``tenant`` is its id, from its latest
``tenant.create`` on (a tenant provisioned again under a deleted id starts afresh and
never sees its predecessor's entries). :class:`TrailIndex` keeps, per tenant, the seqs
of its trail in a packed array (8 bytes an entry), so a page costs a binary search and
``limit`` reads of stored lines, never a pass over the log, and "is seq S this tenant's
own?" is one binary search.

The store's writer observer adds each durable batch in chain order. The entries already
in the log when the service starts are added by one pass over the log in a worker thread
(:func:`scan_trails`) while the service serves; until it is merged (:meth:`TrailIndex.merge`)
the index is not :attr:`~TrailIndex.ready`, and the store answers trail and tenant proof
requests with 503.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from actors.journal.segments import lines_from

TENANT_CREATE = "tenant.create"


class _Owner(msgspec.Struct):
    """The three members of a stored entry the index needs (the rest is skipped)."""

    seq: int
    op: str
    tenant: str | None


def _empty() -> array[int]:
    return array("Q")


class TrailIndex:
    """tenant -> the rising seqs of its own entries (see the module docstring)."""

    __slots__ = ("_restarted", "_seqs", "ready")

    def __init__(self, *, ready: bool = True) -> None:
        self._seqs: dict[str, array[int]] = {}
        #: tenants whose trail started afresh since the index was made (their older
        #: entries, from the scan of the log at start, are not theirs)
        self._restarted: set[str] = set()
        #: False until the entries that were in the log at start are merged in
        self.ready = ready

    def add(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Add durable entries, in chain order."""
        seqs = self._seqs
        for entry in entries:
            tenant = entry["tenant"]
            if tenant is None:
                continue
            if entry["op"] == TENANT_CREATE:
                seqs[tenant] = _empty()
                self._restarted.add(tenant)
            trail = seqs.get(tenant)
            if trail is None:
                trail = seqs[tenant] = _empty()
            trail.append(entry["seq"])

    def merge(self, older: dict[str, array[int]]) -> None:
        """Put the trails of the entries before the ones added so far in front of them."""
        seqs = self._seqs
        for tenant, trail in older.items():
            if tenant in self._restarted:
                continue
            newer = seqs.get(tenant)
            if newer is not None:
                trail.extend(newer)
            seqs[tenant] = trail
        self._restarted.clear()
        self.ready = True

    def page(self, tenant: str, after: int, limit: int) -> tuple[list[int], int | None]:
        """Up to ``limit`` seqs of the tenant's trail after ``after``, and the ``after`` of
        the next page (None when this page reaches the end)."""
        trail = self._seqs.get(tenant)
        if trail is None:
            return [], None
        start = bisect.bisect_right(trail, after)
        page = trail[start : start + limit].tolist()
        more = start + limit < len(trail)
        return page, (page[-1] if more else None)

    def owns(self, tenant: str, seq: int) -> bool:
        """Whether entry ``seq`` is in the tenant's trail."""
        trail = self._seqs.get(tenant)
        if trail is None:
            return False
        at = bisect.bisect_left(trail, seq)
        return at < len(trail) and trail[at] == seq

    def entries(self) -> int:
        """How many seqs the index holds (all tenants)."""
        return sum(len(trail) for trail in self._seqs.values())


def scan_trails(audit_dir: Path, upto: int) -> dict[str, array[int]]:
    """The trails of the entries with seq <= ``upto``, read from the stored lines.

    Blocking (a pass over the log: call it from a worker thread). Only ``seq``, ``op`` and
    ``tenant`` of each line are decoded; a line that does not decode is left out (the
    chain's own checks report damage, this index only follows the log).
    """
    decode = msgspec.json.Decoder(_Owner).decode
    trails: dict[str, array[int]] = {}
    if upto < 1:
        return trails
    for line in lines_from(audit_dir, 1):
        try:
            owner = decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if owner.seq > upto:
            break
        tenant = owner.tenant
        if tenant is None:
            continue
        if owner.op == TENANT_CREATE:
            trails[tenant] = _empty()
        trail = trails.get(tenant)
        if trail is None:
            trail = trails[tenant] = _empty()
        trail.append(owner.seq)
    return trails
