"""The witness and the tenant's audit check, against a fake log server.

A log that cheats on purpose is easiest to play, so :class:`FakeLog` plays the server side
of API.md's proof endpoints (the attacks on a real server's data dir are in
``test_witness_live.py``): a chain of entries kept as API.md describes, a tree and signed
checkpoints from our own merkle and note modules, served to the typed client through
httpx's MockTransport. What is under test is the
checking side, which trusts nothing the fake says unless a signature or proof backs it;
each attack below is a way a real operator could cheat, and the checks must catch it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.journal.merkle import MemoryTree, consistency_proof, inclusion_proof, leaf_hash
from actors.journal.note import (
    COSIGNATURE_V1,
    Checkpoint,
    Signer,
    Verifier,
    open_note,
    sign_checkpoint,
)
from server.client import Client
from server.witness import (
    BadState,
    Inconsistent,
    Refused,
    Unavailable,
    audit_check,
    client_getter,
    stored_line,
    witness_round,
)

ORIGIN = "vm-tenant/5f1c0e"
TOKENS = {"tok-acme": "acme", "tok-beta": "beta"}


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class FakeLog:
    """An audit log as API.md describes it, served over the proof endpoints."""

    def __init__(self, signer: Signer | None = None) -> None:
        self.signer = signer or Signer.generate(ORIGIN)
        self.entries: list[dict[str, Any]] = []
        self.page_size = 3  # small pages, so every check pages through the trail
        self.overrides: dict[str, httpx.Response] = {}
        self.trail_edits: dict[int, dict[str, Any]] = {}
        self.requests: list[str] = []

    def add(self, tenant: str, count: int = 1, detail: str = "") -> None:
        for _ in range(count):
            seq = len(self.entries) + 1
            entry = {
                "seq": seq,
                "ts": f"2026-12-01T10:00:{seq % 60:02d}.000000Z",
                "tenant": tenant,
                "vm": f"vm-{seq:04d}",
                "op": "vm.spawn",
                "outcome": "requested",
                "source": {"ip": "127.0.0.1", "token_id": "tok"},
                "request_id": f"req-{seq}",
                "detail": {"note": detail, "ünïcode": "✓"},
                "prev": self.entries[-1]["hash"] if self.entries else "0" * 64,
            }
            entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()
            self.entries.append(entry)

    def rechain(self, start: int = 1) -> None:
        """Re-hash the chain from ``start`` on, as an operator covering an edit would."""
        for entry in self.entries[start - 1 :]:
            entry.pop("hash")
            index = entry["seq"] - 1
            entry["prev"] = self.entries[index - 1]["hash"] if index else "0" * 64
            entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()

    def tree(self) -> MemoryTree:
        return MemoryTree(leaf_hash(canonical(e)) for e in self.entries)

    def checkpoint(self) -> str:
        tree = self.tree()
        return sign_checkpoint(Checkpoint(ORIGIN, tree.size, tree.root()), self.signer)

    @staticmethod
    def _b64(hashes: list[bytes]) -> list[str]:
        return [base64.b64encode(h).decode() for h in hashes]

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, q = request.url.path, request.url.params
        self.requests.append(path)
        if path in self.overrides:
            return self.overrides[path]
        tenant = TOKENS.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if tenant is None:
            return httpx.Response(401)
        size = len(self.entries)
        if path == "/v1/audit/checkpoint":
            return httpx.Response(200, text=self.checkpoint())
        if path == "/v1/audit/consistency":
            old, new = int(q["from"]), int(q.get("to", size))
            if not 1 <= old <= new <= size:
                return httpx.Response(400)
            proof = consistency_proof(self.tree(), old, new)
            return httpx.Response(200, json={"from": old, "to": new, "hashes": self._b64(proof)})
        if path == "/v1/audit/proof":
            seq, n = int(q["seq"]), int(q.get("tree_size", size))
            if not (1 <= seq <= n <= size) or self.entries[seq - 1]["tenant"] != tenant:
                return httpx.Response(404)
            proof = inclusion_proof(self.tree(), seq - 1, n)
            body = {"seq": seq, "leaf_index": seq - 1, "tree_size": n, "hashes": self._b64(proof)}
            return httpx.Response(200, json=body)
        if path == "/v1/audit":
            after, limit = int(q.get("after", 0)), min(int(q.get("limit", 100)), self.page_size)
            own = [
                self.trail_edits.get(e["seq"], e)
                for e in self.entries
                if e["seq"] > after and e["tenant"] == tenant
            ]
            page = own[:limit]
            following = page[-1]["seq"] if len(own) > limit else None
            return httpx.Response(200, json={"entries": page, "next": following})
        return httpx.Response(404)

    def getter(self, token: str = "tok-acme"):  # type: ignore[no-untyped-def]
        transport = httpx.MockTransport(self.handle)
        return client_getter(Client("http://log.test", token, transport=transport))


@pytest.fixture
def log() -> FakeLog:
    fake = FakeLog()
    for i in range(10):
        fake.add("acme" if i % 3 else "beta")
    return fake


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "witness.state"


def _round(log: FakeLog, state: Path, key: Verifier | None = None) -> str:
    return witness_round(log.getter(), key or log.signer.verifier, state).line()


# --- the witness -----------------------------------------------------------------------


def test_first_round_accepts_a_signed_checkpoint_and_keeps_it(log: FakeLog, state: Path) -> None:
    tree = log.tree()
    assert _round(log, state) == f"consistent 10 {base64.b64encode(tree.root()).decode()}"
    assert state.read_text() == log.checkpoint()  # Ed25519 is deterministic
    assert "/v1/audit/consistency" not in log.requests


def test_a_growing_log_is_consistent_round_after_round(log: FakeLog, state: Path) -> None:
    _round(log, state)
    for grow in (1, 5, 0, 17, 256):
        log.add("acme", grow)
        line = _round(log, state)
        assert line.startswith(f"consistent {len(log.entries)} ")
    assert log.requests.count("/v1/audit/consistency") == 4  # not when the size stayed


def test_a_cosigning_witness_keeps_its_cosignature(log: FakeLog, state: Path) -> None:
    cosigner = Signer.generate("witness.example/w1", COSIGNATURE_V1)
    witness_round(log.getter(), log.signer.verifier, state, cosigner=cosigner)
    note = open_note(state.read_bytes(), [log.signer.verifier, cosigner.verifier])
    assert [s.name for s in note.signatures] == [ORIGIN, "witness.example/w1"]
    log.add("acme", 3)
    witness_round(log.getter(), log.signer.verifier, state, cosigner=cosigner)


def _assert_caught(log: FakeLog, state: Path, match: str, key: Verifier | None = None) -> None:
    before = state.read_bytes()
    with pytest.raises(Inconsistent, match=match):
        _round(log, state, key)
    assert state.read_bytes() == before


def test_attack_an_entry_edited_in_the_middle_and_the_chain_rehashed(
    log: FakeLog, state: Path
) -> None:
    _round(log, state)
    log.entries[4]["detail"] = {"note": "nothing happened here"}
    log.rechain(5)
    _assert_caught(log, state, "two different roots for size 10")
    log.add("acme", 4)  # hiding the edit behind growth does not help
    _assert_caught(log, state, "consistency proof from 10 to 14 does not verify")


def test_attack_the_newest_entries_deleted(log: FakeLog, state: Path) -> None:
    _round(log, state)
    del log.entries[7:]
    _assert_caught(log, state, "shrank from 10 to 7")
    log.add("acme", 6)  # and regrown past the old size with other entries
    _assert_caught(log, state, "does not verify")


def test_attack_history_rewritten_and_resigned_with_the_log_key(log: FakeLog, state: Path) -> None:
    _round(log, state)
    log.add("acme", 20)
    _round(log, state)
    rewritten = FakeLog(log.signer)  # the operator holds the key and re-signs
    rewritten.entries = copy.deepcopy(log.entries[:12])
    rewritten.add("beta", 40, detail="rewritten")
    _assert_caught(rewritten, state, "consistency proof from 30 to 52 does not verify")


def test_attack_two_checkpoints_of_the_same_size(log: FakeLog, state: Path) -> None:
    split = FakeLog(log.signer)
    split.entries = copy.deepcopy(log.entries[:9])
    split.add("acme", 1, detail="the other view")
    assert len(split.entries) == len(log.entries)
    _round(log, state)
    _assert_caught(split, state, "two different roots for size 10")
    # and a witness that saw the other view first catches the first one
    other_state = state.with_name("other.state")
    _round(split, other_state)
    _assert_caught(log, other_state, "two different roots for size 10")


def test_a_checkpoint_signed_by_another_key_is_inconsistent(log: FakeLog, state: Path) -> None:
    _round(log, state)
    impostor = FakeLog(Signer.generate(ORIGIN))
    impostor.entries = copy.deepcopy(log.entries)
    _assert_caught(impostor, state, "does not verify with the log's key", log.signer.verifier)


def test_a_log_that_will_not_prove_consistency_is_inconsistent(log: FakeLog, state: Path) -> None:
    _round(log, state)
    log.add("acme", 2)
    log.overrides["/v1/audit/consistency"] = httpx.Response(404)
    _assert_caught(log, state, "refused a consistency proof from 10 to 12")
    for body in (b"[]", b"not json", b'{"from": 10, "to": 12, "hashes": ["abc"]}',
                 b'{"from": 9, "to": 12, "hashes": []}'):  # fmt: skip
        log.overrides["/v1/audit/consistency"] = httpx.Response(200, content=body)
        _assert_caught(log, state, "consistency proof")


def test_an_unreachable_or_failing_log_is_unavailable_not_inconsistent(
    log: FakeLog, state: Path
) -> None:
    _round(log, state)
    before = state.read_bytes()
    log.add("acme", 2)
    log.overrides["/v1/audit/consistency"] = httpx.Response(503)
    with pytest.raises(Unavailable):
        _round(log, state)
    log.overrides["/v1/audit/checkpoint"] = httpx.Response(401)
    with pytest.raises(Refused):
        _round(log, state)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = Client("http://x", "t", transport=httpx.MockTransport(down))
    with pytest.raises(Unavailable):
        witness_round(client_getter(client), log.signer.verifier, state)
    huge = Client(
        "http://x",
        "t",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"x" * (17 << 20))),
    )
    with pytest.raises(Unavailable, match="larger"):
        witness_round(client_getter(huge), log.signer.verifier, state)
    assert state.read_bytes() == before


def test_a_state_file_that_is_not_this_logs_checkpoint(log: FakeLog, state: Path) -> None:
    state.write_text("garbage\n")
    with pytest.raises(BadState):
        _round(log, state)
    state.write_text(FakeLog().checkpoint())  # another log's key
    with pytest.raises(BadState):
        _round(log, state)


# --- the tenant's audit check ------------------------------------------------------------


def _check(log: FakeLog, token: str = "tok-acme") -> str:
    return audit_check(log.getter(token), log.signer.verifier).line()


def test_audit_check_verifies_the_whole_trail_page_by_page(log: FakeLog) -> None:
    log.add("acme", 8)
    own = sum(e["tenant"] == "acme" for e in log.entries)
    assert _check(log) == f"verified {own} entries in tree {len(log.entries)}"
    assert log.requests.count("/v1/audit") == -(-own // log.page_size)
    assert log.requests.count("/v1/audit/proof") == own
    assert _check(log, "tok-beta").startswith("verified 4 entries")


def test_audit_check_recomputes_leaves_from_the_stored_form(log: FakeLog) -> None:
    entry = log.entries[1]
    assert stored_line(entry) == canonical(entry)
    assert "✓".encode() in stored_line(entry)  # UTF-8, not \\u escapes


def test_audit_check_names_an_entry_the_trail_shows_edited(log: FakeLog) -> None:
    edited = copy.deepcopy(log.entries[4])  # seq 5 is acme's
    edited["detail"] = {"note": "edited"}
    edited.pop("hash")
    edited["hash"] = hashlib.sha256(canonical(edited)).hexdigest()
    log.trail_edits[5] = edited
    with pytest.raises(Inconsistent, match=r"^entry 5: not in the signed tree"):
        _check(log)


def test_audit_check_names_an_entry_whose_hash_is_wrong(log: FakeLog) -> None:
    edited = copy.deepcopy(log.entries[7])
    edited["vm"] = "vm-other"
    log.trail_edits[8] = edited
    with pytest.raises(Inconsistent, match=r"^entry 8: its hash does not match"):
        _check(log)


def test_audit_check_names_an_entry_without_a_proof(log: FakeLog) -> None:
    log.overrides["/v1/audit/proof"] = httpx.Response(404)
    with pytest.raises(Inconsistent, match=r"^entry 2: the log has no inclusion proof"):
        _check(log)


def test_audit_check_refuses_a_trail_of_several_tenants(log: FakeLog) -> None:
    log.trail_edits[5] = {**log.entries[4], "tenant": "beta"}
    with pytest.raises(Inconsistent, match="several tenants"):
        _check(log)
    log.trail_edits[5] = {**log.entries[4], "tenant": ["acme"]}
    with pytest.raises(Inconsistent, match="several tenants"):
        _check(log)


@pytest.mark.parametrize(
    "page",
    [
        b"[]",
        b'{"entries": {}, "next": null}',
        b'{"entries": [{"seq": "1"}], "next": null}',
        b'{"entries": [{"seq": 2}, {"seq": 2}], "next": null}',
        b'{"entries": [], "next": 5}',
        b'{"entries": [{"seq": 2}], "next": 0}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_audit_check_refuses_a_malformed_trail(log: FakeLog, page: bytes) -> None:
    log.overrides["/v1/audit"] = httpx.Response(200, content=page)
    with pytest.raises(Inconsistent):
        _check(log)


def test_audit_check_refuses_an_entry_beyond_the_checkpoint(log: FakeLog) -> None:
    late = FakeLog(log.signer)
    late.entries = copy.deepcopy(log.entries)
    late.add("acme", 1)
    log.trail_edits[11] = late.entries[-1]
    log.entries.append(late.entries[-1])
    checkpoint_of_ten = FakeLog(log.signer)
    checkpoint_of_ten.entries = log.entries[:10]
    log.overrides["/v1/audit/checkpoint"] = httpx.Response(200, text=checkpoint_of_ten.checkpoint())
    with pytest.raises(Inconsistent, match=r"^entry 11 is not in the signed tree of size 10"):
        _check(log)


def test_rate_limits_and_short_unavailability_are_waited_out(log: FakeLog, state: Path) -> None:
    """An audit check asks for a proof per entry, so it meets its rate limit: a 429 is
    waited out (Retry-After), so is a 503 for a while; a 503 that lasts is Unavailable."""
    refusals = {"/v1/audit/proof": 5, "/v1/audit/checkpoint": 2}
    waits: list[float] = []

    def limited(request: httpx.Request) -> httpx.Response:
        left = refusals.get(request.url.path, 0)
        if left:
            refusals[request.url.path] = left - 1
            status = 429 if request.url.path == "/v1/audit/proof" else 503
            return httpx.Response(status, headers={"Retry-After": "2"})
        return log.handle(request)

    client = Client("http://log.test", "tok-acme", transport=httpx.MockTransport(limited))
    get = client_getter(client, sleep=waits.append)
    assert audit_check(get, log.signer.verifier).entries == 6
    assert waits == [2.0] * 7
    log.overrides["/v1/audit/checkpoint"] = httpx.Response(503, headers={"Retry-After": "1"})
    waits.clear()
    with pytest.raises(Unavailable):
        witness_round(get, log.signer.verifier, state)
    assert waits == [1.0] * 10
    assert not state.exists()
