"""``vm-tenant witness`` and ``vm-tenant audit check`` against a real server process.

The attacks are those of an operator who holds the data dir and the log's key: stop the
server, rewrite its data dir (the chain re-hashed as API.md defines it, with the standard
library; the snapshot, the stored checkpoints and the tree thrown away so that the
server rebuilds them and signs the new history with its own key), start it again, and
run the witness that kept the checkpoint it saw before. Each attack must end in exit 1,
``inconsistent: ...`` on stderr and the witness's state file as it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.journal.note import Signer, Verifier, open_checkpoint, open_note
from conftest import LiveServer, bearer, vm_tenant

QUOTA = {"vcpus": 64, "memory_mib": 65536, "vms": 32}
SPEC = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Attacker:
    """Someone with the data dir: reads and rewrites the chain as API.md defines it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def entries(self) -> list[dict[str, Any]]:
        lines: list[bytes] = []
        for segment in sorted((self.data_dir / "audit").glob("*.jsonl")):
            lines += segment.read_bytes().splitlines()
        return [json.loads(line) for line in lines]

    def write(self, entries: list[dict[str, Any]], rehash_from: int = 1) -> None:
        """Write ``entries`` as the whole log, the chain re-hashed from seq ``rehash_from``,
        and throw away what would give the rewrite away or stop the start (snapshot,
        stored checkpoints, the tree): the server rebuilds and re-signs them itself."""
        prev = entries[rehash_from - 2]["hash"] if rehash_from > 1 else "0" * 64
        for entry in entries[rehash_from - 1 :]:
            entry["prev"] = prev
            entry.pop("hash", None)
            entry["hash"] = prev = hashlib.sha256(canonical(entry)).hexdigest()
        audit = self.data_dir / "audit"
        shutil.rmtree(audit)
        audit.mkdir(mode=0o700)
        (audit / "000000000001.jsonl").write_bytes(b"".join(canonical(e) + b"\n" for e in entries))
        shutil.rmtree(self.data_dir / "snapshot", ignore_errors=True)
        shutil.rmtree(self.data_dir / "tree", ignore_errors=True)
        (self.data_dir / "audit-checkpoints.jsonl").unlink(missing_ok=True)


class Log:
    """A live server with a tenant, and the witness's files."""

    def __init__(self, tmp_path: Path) -> None:
        self.server = LiveServer(tmp_path / "data").start()
        self.state = tmp_path / "witness.state"
        self.key_file = tmp_path / "log.vkey"
        with self.http() as client:
            created = client.post(
                "/v1/admin/tenants", json={"id": "acme", "quota": QUOTA}, headers=self.admin
            )
            assert created.status_code == 201
            self.token: str = created.json()["token"]
            key = client.get("/v1/audit/key", headers=bearer(self.token))
            assert key.status_code == 200
            self.key_file.write_text(key.text + "\n")
        self.log_key = Verifier.parse(key.text)

    @property
    def admin(self) -> dict[str, str]:
        return bearer(self.server.admin_token)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=30)

    def spawn(self, count: int) -> list[str]:
        ids = []
        with self.http() as client:
            for _ in range(count):
                answer = client.post("/v1/vms", json=SPEC, headers=bearer(self.token))
                assert answer.status_code == 201, answer.text
                ids.append(answer.json()["id"])
        return ids

    def issue_tokens(self, count: int) -> None:
        with self.http() as client:
            for _ in range(count):
                issued = client.post("/v1/admin/tenants/acme/tokens", headers=self.admin)
                assert issued.status_code == 201

    def witness(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return vm_tenant(
            "witness", "--url", self.server.url, "--token", self.token,
            "--log-key", f"@{self.key_file}", "--state", str(self.state), "--once", *extra,
        )  # fmt: skip

    def restart(self, tamper: Callable[[Attacker], None]) -> None:
        assert self.server.stop(signal.SIGTERM) == 0
        tamper(Attacker(self.server.data_dir))
        self.server.start()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    running = Log(tmp_path)
    try:
        yield running
    finally:
        running.server.kill()


def consistent(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    word, size, root = result.stdout.split()
    assert word == "consistent" and len(base64.b64decode(root, validate=True)) == 32
    return int(size)


def caught(log: Log, kept: bytes, why: str) -> None:
    result = log.witness()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("inconsistent: ") and why in result.stderr, result.stderr
    assert result.stdout == ""
    assert log.state.read_bytes() == kept


def test_a_witness_follows_an_honest_log_and_a_tenant_checks_its_trail(log: Log) -> None:
    log.spawn(3)
    first = consistent(log.witness())
    assert first == 7  # the creation, and a requested and a succeeded entry per spawn
    kept, _ = open_checkpoint(log.state.read_text(), log.log_key)
    assert kept.size == 7
    log.spawn(2)
    log.issue_tokens(1)
    assert consistent(log.witness()) == 12
    assert consistent(log.witness()) == 12  # nothing new: the same tree again
    # -o json
    answer = json.loads(log.witness("-o", "json").stdout)
    assert answer["consistent"] is True and answer["size"] == 12

    check = vm_tenant(
        "audit", "check", "--url", log.server.url, "--token", log.token,
        "--log-key", f"@{log.key_file}",
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "verified 12 entries in tree 12"

    # a restart keeps the log's identity and history: still consistent
    assert log.server.stop(signal.SIGTERM) == 0
    log.server.start()
    log.spawn(1)
    assert consistent(log.witness()) == 14


def test_the_exit_codes_of_a_witness_that_cannot_conclude(log: Log, tmp_path: Path) -> None:
    consistent(log.witness())
    kept = log.state.read_bytes()
    refused = vm_tenant(
        "witness", "--url", log.server.url, "--token", "not-a-token",
        "--log-key", f"@{log.key_file}", "--state", str(log.state), "--once",
    )  # fmt: skip
    assert refused.returncode == 1 and "401" in refused.stderr
    other = tmp_path / "other.state"
    other.write_text("not a checkpoint\n")
    bad_state = vm_tenant(
        "witness", "--url", log.server.url, "--token", log.token,
        "--log-key", f"@{log.key_file}", "--state", str(other), "--once",
    )  # fmt: skip
    assert bad_state.returncode == 2 and "holds no checkpoint" in bad_state.stderr
    bad_key = log.witness("--log-key", "vm-tenant/x+00000000+AAAA")
    assert bad_key.returncode == 2 and "--log-key" in bad_key.stderr
    url = log.server.url
    log.server.kill()
    down = vm_tenant(
        "witness", "--url", url, "--token", log.token, "--log-key", f"@{log.key_file}",
        "--state", str(log.state), "--once",
    )  # fmt: skip
    assert down.returncode == 3
    assert log.state.read_bytes() == kept


def test_a_key_of_another_log_is_a_bad_signature(log: Log, tmp_path: Path) -> None:
    """A well-formed VKEY under the same origin that did not sign the log: exit 1.

    Also when the state file holds a checkpoint the right key signed: the log's own
    signature is checked first, and it is the bad one.
    """
    consistent(log.witness())
    kept = log.state.read_bytes()
    impostor = tmp_path / "impostor.vkey"
    impostor.write_text(f"{Signer.generate(log.log_key.name).verifier}\n")
    assert log.log_key.name in impostor.read_text()
    for state in (log.state, tmp_path / "fresh.state"):
        result = vm_tenant(
            "witness", "--url", log.server.url, "--token", log.token,
            "--log-key", f"@{impostor}", "--state", str(state), "--once",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("inconsistent: "), result.stderr
        assert result.stdout == ""
    assert log.state.read_bytes() == kept
    assert not (tmp_path / "fresh.state").exists()


def test_a_witness_loop_runs_until_sigterm_and_cosigns(log: Log, tmp_path: Path) -> None:
    key = tmp_path / "witness.key"
    made = vm_tenant("audit", "witness-key", "witness.example/w1", "--out", str(key))
    assert made.returncode == 0, made.stderr
    witness_key = Verifier.parse(made.stdout.strip())
    assert key.stat().st_mode & 0o777 == 0o600
    with subprocess.Popen(
        [sys.executable, "-m", "server.cli", "witness", "--url", log.server.url,
         "--token", log.token, "--log-key", f"@{log.key_file}", "--state", str(log.state),
         "--interval", "0.2", "--cosign-key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as loop:  # fmt: skip
        try:
            assert loop.stdout is not None
            assert loop.stdout.readline().startswith("consistent 1 ")
            log.spawn(1)
            while not (line := loop.stdout.readline()).startswith("consistent 3 "):
                assert line.startswith("consistent 1 "), line
            loop.send_signal(signal.SIGTERM)
            assert loop.wait(30) == 0
        finally:
            loop.kill()
    # the kept checkpoint carries the witness's own cosignature, which its key verifies
    note = log.state.read_text()
    assert open_checkpoint(note, log.log_key)[0].size == 3
    cosigned = open_note(note, [log.log_key, witness_key])
    assert {s.name for s in cosigned.signatures} == {log.log_key.name, "witness.example/w1"}


# --- the attacks ----------------------------------------------------------------------------


def test_attack_an_entry_edited_in_the_middle_and_the_chain_rehashed(log: Log) -> None:
    log.spawn(4)
    size = consistent(log.witness())
    kept = log.state.read_bytes()

    def edit(attacker: Attacker) -> None:
        entries = attacker.entries()
        middle = size // 2
        assert entries[middle - 1]["op"] == "vm.spawn"
        entries[middle - 1]["detail"]["image"] = "backdoored-image"
        attacker.write(entries, rehash_from=middle)

    log.restart(edit)
    log.spawn(1)  # the log goes on growing, under the same key
    caught(log, kept, "does not verify")


def test_attack_the_newest_entries_deleted(log: Log) -> None:
    log.spawn(2)
    log.issue_tokens(3)
    size = consistent(log.witness())
    kept = log.state.read_bytes()
    log.restart(lambda attacker: attacker.write(attacker.entries()[:-2], rehash_from=size - 1))
    caught(log, kept, f"shrank from {size} to {size - 2}")


def test_attack_history_rewritten_from_a_point_and_resigned(log: Log) -> None:
    log.spawn(3)
    size = consistent(log.witness())
    kept = log.state.read_bytes()
    # everything after the tenant's creation is dropped; the log then grows past the size
    # the witness saw, with other entries, all signed by the log's own key
    log.restart(lambda attacker: attacker.write(attacker.entries()[:1], rehash_from=2))
    log.issue_tokens(size)
    caught(log, kept, "rewrote its history")


def test_attack_two_checkpoints_of_the_same_size(log: Log) -> None:
    log.spawn(1)
    log.issue_tokens(2)
    size = consistent(log.witness())
    kept = log.state.read_bytes()

    def fork(attacker: Attacker) -> None:
        entries = attacker.entries()
        entries[-1]["detail"]["token_id"] = "tok-0000000000000000"
        attacker.write(entries, rehash_from=size)

    log.restart(fork)
    caught(log, kept, f"two different roots for size {size}")
