"""The audit entry as its writer drafts it, before the chain gives it a place.

A *draft* holds the fields its writer decides: ``ts`` (when it was drafted), ``op``,
``outcome``, ``tenant``, ``vm``, ``source``, ``request_id`` and ``detail``. Sequencing adds
``seq``, ``prev`` and ``hash`` (``actors/journal/chain.py``); nothing else changes, so the
fold (``actors/journal/fold.py``) gives the same state for a draft and its stored entry.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

#: an audit entry or a draft of one (JSON data)
Entry = dict[str, Any]

#: the fields of a draft; a stored entry has these plus ``seq``, ``prev`` and ``hash``
DRAFT_FIELDS = ("ts", "op", "outcome", "tenant", "vm", "source", "request_id", "detail")

#: the source of entries the proxy writes itself (resolutions, late outcomes)
SYSTEM_SOURCE: dict[str, Any] = {"ip": None, "token_id": "system"}


def utc_now() -> str:
    """An RFC 3339 UTC timestamp with microseconds, as the audit lines carry them."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def draft(
    op: str,
    outcome: str,
    tenant: str | None,
    vm: str | None,
    source: dict[str, Any],
    request_id: str | None,
    detail: dict[str, Any],
    ts: str | None = None,
) -> Entry:
    """A draft entry, stamped now unless ``ts`` is given."""
    return {
        "ts": ts or utc_now(),
        "op": op,
        "outcome": outcome,
        "tenant": tenant,
        "vm": vm,
        "source": source,
        "request_id": request_id,
        "detail": detail,
    }
