"""``vm-tenant audit verify`` and the start-up checks, on real data dirs.

A live server writes a few dozen audit entries and is stopped with SIGTERM, so that it
writes its signed checkpoint. Each test damages a copy of that data dir the way an
attacker or a crash would (edit, delete, swap, truncate, rewrite with fresh hashes, torn
last line, forged checkpoint) and runs the real command as a subprocess; the last tests
start a real server on damaged data dirs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymerkle import InmemoryTree

from actors.journal import verify as verify_module
from actors.journal.note import Signer, Verifier, open_checkpoint, sign_note
from conftest import LiveServer, audit_lines

ROOT = Path(__file__).resolve().parents[2]
GENESIS = "0" * 64
SPEC: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
QUOTA = {"vcpus": 100, "memory_mib": 100_000, "vms": 100}


# -- helpers -------------------------------------------------------------------------------


def canonical(entry: dict[str, Any]) -> bytes:
    """The canonical form API.md fixes for hashing (and used here for stored lines)."""
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def segment(data_dir: Path) -> Path:
    """The audit log's only segment (a few dozen entries never fill a second one)."""
    segments = sorted((data_dir / "audit").glob("*.jsonl"))
    assert [p.name for p in segments] == ["000000000001.jsonl"]
    return segments[0]


def read_lines(data_dir: Path) -> list[bytes]:
    return segment(data_dir).read_bytes().splitlines()


def write_lines(data_dir: Path, lines: list[bytes]) -> None:
    segment(data_dir).write_bytes(b"".join(line + b"\n" for line in lines))


def verify(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "audit",
            "verify",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def names_seq(text: str, seq: int) -> bool:
    return re.search(rf"\bseq {seq}\b", text) is not None


def checkpoints(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "audit-checkpoints.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def write_checkpoints(data_dir: Path, items: list[dict[str, Any]]) -> None:
    path = data_dir / "audit-checkpoints.jsonl"
    path.write_bytes(b"".join(json.dumps(c).encode() + b"\n" for c in items))


def make_entries(server: LiveServer) -> None:
    """A few dozen audit entries of every kind of operation, through the real API."""
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        response = client.post(
            "/v1/admin/tenants", json={"id": "audited", "quota": QUOTA}, headers=admin
        )
        assert response.status_code == 201, response.text
        tenant = {"Authorization": f"Bearer {response.json()['token']}"}
        response = client.post("/v1/admin/tenants/audited/tokens", headers=admin)
        assert response.status_code == 201
        ids = []
        for i in range(12):
            response = client.post("/v1/vms", json={**SPEC, "name": f"a-{i}"}, headers=tenant)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        for vm_id in ids[:5]:
            assert client.delete(f"/v1/vms/{vm_id}", headers=tenant).status_code == 200
        response = client.patch(
            "/v1/admin/tenants/audited", json={"quota": {**QUOTA, "vms": 7}}, headers=admin
        )
        assert response.status_code == 200
        response = client.post("/v1/vms", json=SPEC, headers=tenant)
        assert response.status_code == 403  # quota: a rejected spawn is audited too


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a few dozen entries, left by a SIGTERM (so: a final checkpoint)."""
    server = LiveServer(tmp_path_factory.mktemp("pristine") / "data").start()
    try:
        make_entries(server)
        assert server.stop(signal.SIGTERM) == 0, "".join(server.log)
    finally:
        server.kill()
    return server.data_dir


@pytest.fixture
def data_dir(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine data dir, to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(pristine, copy)
    return copy


# -- the pristine log ----------------------------------------------------------------------


def test_intact_log_verifies_with_count_and_head(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    assert len(lines) >= 36
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(entry_hash(e) == e["hash"] for e in entries)  # API.md's hash, recomputed
    head = entries[-1]["hash"]
    # The shutdown wrote a signed checkpoint of the head.
    assert checkpoints(data_dir)[-1]["seq"] == len(entries)
    assert checkpoints(data_dir)[-1]["hash"] == head

    result = verify(data_dir)
    assert result.returncode == 0, output(result)
    summary = result.stdout.strip()
    assert "\n" not in summary
    assert re.search(rf"\b{len(entries)}\b", summary), summary
    assert head in summary


# -- damage the chain shows by itself -------------------------------------------------------


def test_an_edited_field_is_tampered_at_its_seq(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    entry = json.loads(lines[9])
    assert entry["seq"] == 10
    entry["source"]["ip"] = "203.0.113.7"  # still valid JSON, old hash kept
    lines[9] = canonical(entry)
    write_lines(data_dir, lines)

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), 10), output(result)


def test_a_deleted_middle_line_is_tampered(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    del lines[14]  # seq 15
    write_lines(data_dir, lines)

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), 15), output(result)


def test_two_swapped_lines_are_tampered(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    lines[19], lines[20] = lines[20], lines[19]  # seq 20 and 21
    write_lines(data_dir, lines)

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), 20), output(result)


def test_a_renamed_segment_is_tampered(data_dir: Path) -> None:
    only = segment(data_dir)
    only.rename(only.with_name("000000000002.jsonl"))  # its first entry is seq 1

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), 1), output(result)
    assert "000000000002.jsonl" in output(result)


def test_a_second_segment_named_off_by_one_is_tampered(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    first, rest = lines[:20], lines[20:]  # the second segment starts at seq 21
    write_lines(data_dir, first)
    (data_dir / "audit" / "000000000022.jsonl").write_bytes(b"".join(x + b"\n" for x in rest))
    # Correctly named, the very same split verifies: only the name is wrong.
    (data_dir / "audit" / "000000000022.jsonl").rename(data_dir / "audit" / "000000000021.jsonl")
    assert verify(data_dir).returncode == 0, output(verify(data_dir))
    (data_dir / "audit" / "000000000021.jsonl").rename(data_dir / "audit" / "000000000022.jsonl")

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), 21), output(result)


def test_a_segment_renamed_out_of_the_naming_scheme_is_tampered(data_dir: Path) -> None:
    only = segment(data_dir)
    only.rename(only.with_name("old.jsonl"))
    (data_dir / "audit-checkpoints.jsonl").unlink()  # else it would also read as truncated

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert "old.jsonl" in output(result)
    assert names_seq(output(result), 1), output(result)


# -- damage only the checkpoints (or a head kept elsewhere) reveal -------------------------


def test_deleting_the_newest_lines_is_truncated(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    kept = len(lines) - 5
    write_lines(data_dir, lines[:kept])

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "truncated" in output(result)
    assert names_seq(output(result), kept + 1), output(result)


def test_truncation_is_caught_by_an_expected_head_without_checkpoints(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    head = json.loads(lines[-1])
    write_lines(data_dir, lines[:-5])
    (data_dir / "audit-checkpoints.jsonl").unlink()
    # The sealed snapshot names the seq it covers: evidence of the cut by itself...
    result = verify(data_dir)
    assert result.returncode == 1 and "truncated" in output(result), output(result)
    (data_dir / "snapshot" / "state.json").unlink()

    # ...without any evidence from outside the log, a clean cut cannot be seen...
    assert verify(data_dir).returncode == 0
    # ...but a head kept elsewhere shows it.
    result = verify(data_dir, "--expect-head", f"{head['seq']}:{head['hash']}")
    assert result.returncode == 1, output(result)
    assert "truncated" in output(result)


def test_an_expected_head_that_differs_is_tampered(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    middle = json.loads(lines[20])
    other = hashlib.sha256(b"not this one").hexdigest()

    assert verify(data_dir, "--expect-head", f"{middle['seq']}:{middle['hash']}").returncode == 0
    result = verify(data_dir, "--expect-head", f"{middle['seq']}:{other}")
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), middle["seq"]), output(result)


def test_a_chain_rewritten_with_fresh_hashes_is_tampered(data_dir: Path) -> None:
    entries = [json.loads(line) for line in read_lines(data_dir)]
    entries[4]["source"]["ip"] = "203.0.113.7"  # the lie, seq 5
    prev = GENESIS
    rewritten = []
    for entry in entries:
        entry.pop("hash")
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)
        rewritten.append(canonical(entry))
    write_lines(data_dir, rewritten)

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)

    # The rewrite itself is self-consistent: only what the key signed gives it away, the
    # checkpoints and the sealed snapshot's anchor.
    (data_dir / "audit-checkpoints.jsonl").unlink()
    result = verify(data_dir)
    assert result.returncode == 1 and "snapshot anchor" in output(result), output(result)
    (data_dir / "snapshot" / "state.json").unlink()
    assert verify(data_dir).returncode == 0


def forge_signature(checkpoint: dict[str, Any]) -> None:
    raw = bytearray(base64.b64decode(checkpoint["signature"]))
    raw[0] ^= 0x01
    checkpoint["signature"] = base64.b64encode(bytes(raw)).decode()


def forge_hash(checkpoint: dict[str, Any]) -> None:
    checkpoint["hash"] = hashlib.sha256(b"forged").hexdigest()


def sign_with_another_key(checkpoint: dict[str, Any]) -> None:
    checkpoint["hash"] = hashlib.sha256(b"forged").hexdigest()
    signed = canonical({k: checkpoint[k] for k in ("seq", "hash", "ts")})
    signature = Ed25519PrivateKey.generate().sign(signed)
    checkpoint["signature"] = base64.b64encode(signature).decode()


@pytest.mark.parametrize(
    "forge",
    [forge_signature, forge_hash, sign_with_another_key],
    ids=["flipped-signature", "changed-hash", "foreign-key"],
)
def test_a_forged_checkpoint_fails(data_dir: Path, forge: Callable[[dict[str, Any]], None]) -> None:
    items = checkpoints(data_dir)
    forge(items[-1])
    write_checkpoints(data_dir, items)

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)


# -- the Merkle roots and notes of the checkpoints --------------------------------------------


def test_every_checkpoint_carries_the_trees_root_and_a_note(data_dir: Path) -> None:
    stored = checkpoints(data_dir)[-1]
    assert {"size", "root", "note"} <= stored.keys() and stored["size"] == stored["seq"]
    key = Verifier.parse((data_dir / "keys" / "audit-note.vkey").read_text().strip())
    tree, _ = open_checkpoint(stored["note"], key)
    reference = InmemoryTree(algorithm="sha256")  # shares no code with ours
    for line in read_lines(data_dir)[: tree.size]:
        reference.append_entry(line)
    assert tree.root == reference.get_root(tree.size)
    assert base64.b64decode(stored["root"]) == tree.root


def test_a_line_respelled_without_changing_its_entry_is_tampered(data_dir: Path) -> None:
    """The chain hashes the canonical form, so an extra space leaves it intact; the tree
    hashes the stored bytes, so the signed root no longer matches."""
    lines = read_lines(data_dir)
    lines[6] = lines[6].replace(b'"seq":7,', b'"seq": 7,')
    write_lines(data_dir, lines)
    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    size = checkpoints(data_dir)[-1]["size"]
    assert "tampered" in output(result) and "Merkle root" in output(result), output(result)
    assert names_seq(output(result), size)


def respell_root(checkpoint: dict[str, Any]) -> None:
    checkpoint["root"] = base64.b64encode(hashlib.sha256(b"other").digest()).decode()


def forge_note(checkpoint: dict[str, Any]) -> None:
    text, _, signature = checkpoint["note"].partition("\n\n")
    origin, size, _root = text.split("\n")[:3]
    other = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    checkpoint["note"] = f"{origin}\n{size}\n{other}\n\n{signature}"


def note_by_another_key(checkpoint: dict[str, Any]) -> None:
    text = checkpoint["note"].partition("\n\n")[0] + "\n"
    origin = text.partition("\n")[0]
    checkpoint["note"] = sign_note(text, [Signer.generate(origin)])


@pytest.mark.parametrize(
    "forge", [respell_root, forge_note, note_by_another_key], ids=["root", "note", "key"]
)
def test_a_forged_tree_head_fails(data_dir: Path, forge: Callable[[dict[str, Any]], None]) -> None:
    items = checkpoints(data_dir)
    forge(items[-1])
    write_checkpoints(data_dir, items)
    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "checkpoint" in output(result) and "tampered" in output(result)


def test_roots_computed_in_a_second_process_agree(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a big log does (PARALLEL_BYTES lowered): the roots come from another process."""
    monkeypatch.setattr(verify_module, "PARALLEL_BYTES", 0)
    started = []
    real = verify_module._start_roots
    monkeypatch.setattr(
        verify_module, "_start_roots", lambda *args: started.append(args) or real(*args)
    )
    assert verify_module.verify_data_dir(data_dir).verdict == "ok"
    lines = read_lines(data_dir)
    lines[6] = lines[6].replace(b'"seq":7,', b'"seq": 7,')
    write_lines(data_dir, lines)
    report = verify_module.verify_data_dir(data_dir)
    assert (report.verdict, report.bad_seq) == ("tampered", checkpoints(data_dir)[-1]["size"])
    assert len(started) == 2


# -- a write in progress --------------------------------------------------------------------


def test_a_torn_last_line_alone_is_reported_and_accepted(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    with segment(data_dir).open("ab") as f:
        f.write(b'{"seq": %d, "ts": "2026-11-27T22:1' % (len(lines) + 1))

    result = verify(data_dir)
    assert result.returncode == 0, output(result)
    assert "torn" in output(result)


def test_a_torn_line_in_the_middle_is_tampered(data_dir: Path) -> None:
    lines = read_lines(data_dir)
    lines[10] = lines[10][: len(lines[10]) // 2]  # cut short, but more lines follow
    write_lines(data_dir, lines)

    result = verify(data_dir)
    assert result.returncode == 1, output(result)
    assert "tampered" in output(result)
    assert names_seq(output(result), 11), output(result)


# -- what a start does with damage ----------------------------------------------------------


def test_the_server_refuses_to_start_on_a_damaged_replayed_part(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data").start()
    try:
        make_entries(server)
    finally:
        server.kill()  # kill -9: no final snapshot, so a start replays the whole log
    lines = read_lines(server.data_dir)
    entry = json.loads(lines[5])
    entry["detail"]["forged"] = True
    lines[5] = canonical(entry)
    write_lines(server.data_dir, lines)
    damaged = segment(server.data_dir).read_bytes()

    server.log.clear()
    try:
        with pytest.raises(RuntimeError, match="server did not start"):
            server.start()
    finally:
        server.kill()
    assert server.proc is not None
    assert server.proc.wait(30) != 0
    log = "".join(server.log)
    assert "tampered" in log, log
    assert names_seq(log, 6), log
    # The damaged journal was not touched, let alone appended to.
    assert segment(server.data_dir).read_bytes() == damaged


def same_length_edit(entry: dict[str, Any]) -> None:
    assert entry["source"]["ip"] == "127.0.0.1"
    entry["source"]["ip"] = "127.0.0.2"


def longer_edit(entry: dict[str, Any]) -> None:
    entry["detail"]["forged"] = True


@pytest.mark.parametrize(
    "edit", [same_length_edit, longer_edit], ids=["same-length", "longer-line"]
)
def test_damage_before_the_snapshot_stops_writes_but_not_the_start(
    data_dir: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Per API.md the part before the snapshot's anchor is verified after the start.

    The anchor entry itself is untouched (it still matches the log), whatever the
    damaged line's length; damage before it turns ``/readyz`` and every write to 503.
    """
    lines = read_lines(data_dir)
    entry = json.loads(lines[2])
    edit(entry)
    lines[2] = canonical(entry)
    write_lines(data_dir, lines)
    damaged = segment(data_dir).read_bytes()

    server = LiveServer(data_dir).start()
    try:
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            ready: httpx.Response | None = None
            for _ in range(200):  # the older part is verified in the background
                ready = client.get("/readyz")
                if ready.status_code != 200:
                    break
                time.sleep(0.05)
            assert ready is not None and ready.status_code == 503, ready
            response = client.post("/v1/admin/tenants/audited/tokens", headers=admin)
            assert response.status_code == 503
            assert response.json()["code"] == "audit_unavailable"
    finally:
        server.kill()
    assert segment(data_dir).read_bytes() == damaged


def test_a_torn_last_line_is_cut_on_start(data_dir: Path) -> None:
    intact = segment(data_dir).read_bytes()
    lines = audit_lines(data_dir)
    head = json.loads(lines[-1])
    with segment(data_dir).open("ab") as f:
        f.write(b'{"seq": %d, "ts": "2026-11-27T22:1' % (head["seq"] + 1))

    server = LiveServer(data_dir).start()
    try:
        assert segment(data_dir).read_bytes() == intact  # cut back before serving
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            response = client.post("/v1/admin/tenants/audited/tokens", headers=admin)
            assert response.status_code == 201, response.text
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()

    lines = audit_lines(data_dir)
    assert len(lines) == head["seq"] + 1
    new = json.loads(lines[-1])
    assert new["seq"] == head["seq"] + 1
    assert new["prev"] == head["hash"]
    assert new["op"] == "token.issue"
    result = verify(data_dir)
    assert result.returncode == 0, output(result)
    assert "torn" not in output(result)
