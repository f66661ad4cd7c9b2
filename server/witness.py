"""Checking a log from outside: a witness round and a tenant's own audit check.

Both procedures talk to the log only through a :data:`Get` function (a path and query
parameters in, a status and body out), so they run over the typed client
(:func:`client_getter`, which the CLI uses) or a test's fake server alike, and they trust
nothing the log says unless a signature or a proof backs it: they read raw bodies and
parse them themselves.

- :func:`witness_round` (``vm-tenant witness``): fetch the checkpoint, verify it with the
  log's key, and, when the state file holds an earlier checkpoint, demand and check a
  consistency proof from that size; only then replace the state file (atomically).
- :func:`audit_check` (``vm-tenant audit check``): read the caller's whole trail, then the
  checkpoint (which covers every write acknowledged before it), and check an inclusion
  proof for every entry, each leaf recomputed from the entry as stored.

What can go wrong, by cause (the CLI maps these to its exit codes)::

    WitnessError
    ├── Inconsistent   the log contradicts its key, its proofs or its own history (1)
    ├── Refused        the log answered 4xx to a request it should serve (1)
    ├── Unavailable    the log could not be reached or answered 5xx (3)
    └── BadState       the witness's own state file cannot be used (2)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from actors.fsutil import atomic_write
from actors.journal.merkle import leaf_hash, verify_consistency, verify_inclusion
from actors.journal.note import (
    Checkpoint,
    Note,
    NoteError,
    Signer,
    Verifier,
    cosign,
    open_checkpoint,
)
from server.client import Client, Unreachable
from server.client.sync import retry_after

PAGE = 1000


class Response(NamedTuple):
    status: int
    body: bytes


Get = Callable[[str, Mapping[str, str]], Response]
"""``get(path, query)``: one GET against the log; raises :class:`Unavailable` if unreachable."""


class WitnessError(Exception):
    """A check that did not conclude that the log is consistent."""


class Inconsistent(WitnessError):
    """The log contradicts its key, its proofs or what it showed before."""


class Refused(WitnessError):
    """The log answered 4xx to a request it should have served."""


class Unavailable(WitnessError):
    """The log could not be reached or answered 5xx."""


class BadState(WitnessError):
    """The witness's state file is unreadable or holds no checkpoint of this log."""


#: how many times a 429 (the caller's rate limit: an audit check asks for one proof per
#: entry) or a 503 (the log is rebuilding its tree or index) is waited out, Retry-After
#: seconds each (at most MAX_WAIT), before the answer counts as it is
PATIENCE = {429: 600, 503: 10}
MAX_WAIT = 30.0


def client_getter(client: Client, *, sleep: Callable[[float], None] = time.sleep) -> Get:
    """A :data:`Get` over the typed client (its URL, token and TLS settings); answers over
    16 MiB, like no answer at all, are :class:`Unavailable`. A 429 or a 503 is retried
    after its ``Retry-After`` (see :data:`PATIENCE`)."""

    def get(path: str, query: Mapping[str, str]) -> Response:
        attempts = 0
        while True:
            try:
                status, body, headers = client.fetch(path, query)
            except Unreachable as error:
                raise Unavailable(f"GET {path}: {error}") from None
            attempts += 1
            if attempts > PATIENCE.get(status, 0):
                return Response(status, body)
            wait = retry_after(headers)
            sleep(min(float(wait if wait is not None else 1), MAX_WAIT))

    return get


def _fetch(get: Get, path: str, query: Mapping[str, str] | None = None) -> bytes:
    response = get(path, query or {})
    if response.status >= 500:
        raise Unavailable(f"GET {path}: HTTP {response.status}")
    if response.status != 200:
        raise Refused(f"GET {path}: HTTP {response.status}")
    return response.body


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Inconsistent(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise Inconsistent(f"{what} is not a JSON object")
    return value


def _hashes(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) > 128:
        raise Inconsistent(f"{what}: hashes is not a list of at most 128 hashes")
    out = []
    for item in value:
        try:
            digest = base64.b64decode(str(item), validate=True) if isinstance(item, str) else b""
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) != 32 or base64.b64encode(digest).decode() != item:
            raise Inconsistent(f"{what}: {item!r} is not a base64 SHA-256 hash")
        out.append(digest)
    return out


def fetch_checkpoint(get: Get, log_key: Verifier) -> tuple[Checkpoint, Note]:
    """The log's current checkpoint, verified with its key, and its note."""
    body = _fetch(get, "/v1/audit/checkpoint")
    try:
        return open_checkpoint(body, log_key)
    except NoteError as error:
        raise Inconsistent(f"the checkpoint does not verify with the log's key: {error}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the witness ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Consistent:
    """A witness round that found the log consistent; ``line()`` is what it prints."""

    checkpoint: Checkpoint
    previous: Checkpoint | None

    def line(self) -> str:
        return f"consistent {self.checkpoint.size} {_b64(self.checkpoint.root)}"


def load_state(state: Path, log_key: Verifier) -> Checkpoint | None:
    """The checkpoint the state file holds (verified again), or None when there is none."""
    try:
        data = state.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise BadState(f"{state}: {error.strerror}") from None
    try:
        return open_checkpoint(data, log_key)[0]
    except NoteError as error:
        raise BadState(f"{state} holds no checkpoint signed by this log's key: {error}") from None


def witness_round(
    get: Get, log_key: Verifier, state: Path, *, cosigner: Signer | None = None
) -> Consistent:
    """One round of ``vm-tenant witness``; the state file changes only when consistent.

    With ``cosigner`` (a type-0x04 key), the checkpoint kept in the state file carries
    the witness's own tlog-cosignature, so it can be shown to third parties.
    """
    # The log's signature first: a checkpoint that VKEY does not verify is "inconsistent"
    # (exit 1) whatever the state file holds, also when the state file was kept under
    # another key; only a log that does verify makes an unusable state file the problem.
    checkpoint, note = fetch_checkpoint(get, log_key)
    previous = load_state(state, log_key)
    if previous is not None:
        _check_extends(get, previous, checkpoint)
    if cosigner is not None:
        note = cosign(note, cosigner)
    atomic_write(state, note.render().encode(), mode=0o644)
    return Consistent(checkpoint, previous)


def _check_extends(get: Get, old: Checkpoint, new: Checkpoint) -> None:
    if new.size < old.size:
        raise Inconsistent(f"the tree shrank from {old.size} to {new.size} entries")
    if new.size == old.size:
        if new.root != old.root:
            raise Inconsistent(
                f"two different roots for size {new.size}: "
                f"{_b64(old.root)} before, {_b64(new.root)} now"
            )
        return
    if old.size == 0:
        if not verify_consistency(0, new.size, old.root, new.root, []):
            raise Inconsistent("the earlier empty tree has a root that is not the empty root")
        return
    path, query = "/v1/audit/consistency", {"from": str(old.size), "to": str(new.size)}
    response = get(path, query)
    if response.status >= 500:
        raise Unavailable(f"GET {path}: HTTP {response.status}")
    if response.status != 200:
        raise Inconsistent(
            f"the log refused a consistency proof from {old.size} to {new.size} "
            f"(HTTP {response.status})"
        )
    what = f"the consistency proof from {old.size} to {new.size}"
    answer = _json_object(response.body, what)
    if answer.get("from") != old.size or answer.get("to") != new.size:
        raise Inconsistent(f"{what} names other sizes")
    proof = _hashes(answer.get("hashes"), what)
    if not verify_consistency(old.size, new.size, old.root, new.root, proof):
        raise Inconsistent(f"{what} does not verify: the log rewrote its history")


# --- the tenant's own check -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verified:
    """An audit check that verified every entry of the caller's trail."""

    entries: int
    tree_size: int

    def line(self) -> str:
        return f"verified {self.entries} entries in tree {self.tree_size}"


def stored_line(entry: dict[str, Any]) -> bytes:
    """An entry's bytes as the log stores them (API.md's canonical form, with ``hash``)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(stored_line(body)).hexdigest()


def read_trail(get: Get) -> list[dict[str, Any]]:
    """The caller's whole trail, page by page, checked for shape and rising seqs."""
    entries: list[dict[str, Any]] = []
    after = 0
    while True:
        what = f"the trail page after {after}"
        page = _json_object(
            _fetch(get, "/v1/audit", {"after": str(after), "limit": str(PAGE)}), what
        )
        items, following = page.get("entries"), page.get("next")
        if not isinstance(items, list) or len(items) > PAGE:
            raise Inconsistent(f"{what} has no list of entries")
        for entry in items:
            seq = entry.get("seq") if isinstance(entry, dict) else None
            if type(seq) is not int or seq <= (entries[-1]["seq"] if entries else after):
                raise Inconsistent(f"{what} lists an entry out of order: {str(entry)[:80]}")
            entries.append(entry)
        if following is None:
            return entries
        if type(following) is not int or following <= after or not items:
            raise Inconsistent(f"{what} points to a next page that does not move forward")
        after = following


def audit_check(get: Get, log_key: Verifier) -> Verified:
    """``vm-tenant audit check``: every entry of the caller's trail is in the signed tree.

    The trail is read first and the checkpoint after it, so the checkpoint covers every
    entry read; an entry that fails raises :class:`Inconsistent` naming its seq.
    """
    trail = read_trail(get)
    checkpoint, _ = fetch_checkpoint(get, log_key)
    tenants = {str(entry.get("tenant")) for entry in trail}
    if len(tenants) > 1 or any(type(entry.get("tenant")) is not str for entry in trail):
        raise Inconsistent(
            f"the trail mixes the entries of several tenants: {sorted(map(str, tenants))}"
        )
    for entry in trail:
        _check_entry(get, entry, checkpoint)
    return Verified(len(trail), checkpoint.size)


def _check_entry(get: Get, entry: dict[str, Any], checkpoint: Checkpoint) -> None:
    seq = entry["seq"]
    name = f"entry {seq}"
    if entry.get("hash") != _entry_hash(entry):
        raise Inconsistent(f"{name}: its hash does not match its content")
    if seq > checkpoint.size:
        raise Inconsistent(f"{name} is not in the signed tree of size {checkpoint.size}")
    path, query = "/v1/audit/proof", {"seq": str(seq), "tree_size": str(checkpoint.size)}
    response = get(path, query)
    if response.status >= 500:
        raise Unavailable(f"GET {path}: HTTP {response.status}")
    if response.status != 200:
        raise Inconsistent(
            f"{name}: the log has no inclusion proof for it (HTTP {response.status})"
        )
    answer = _json_object(response.body, f"{name}: the inclusion proof")
    if (
        answer.get("seq") != seq
        or answer.get("leaf_index") != seq - 1
        or answer.get("tree_size") != checkpoint.size
    ):
        raise Inconsistent(f"{name}: the inclusion proof names another entry or tree")
    proof = _hashes(answer.get("hashes"), f"{name}: the inclusion proof")
    leaf = leaf_hash(stored_line(entry))
    if not verify_inclusion(leaf, seq - 1, checkpoint.size, proof, checkpoint.root):
        raise Inconsistent(f"{name}: not in the signed tree (its inclusion proof does not verify)")
