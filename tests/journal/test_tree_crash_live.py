"""kill -9 of a real server in the middle of a burst: afterwards tree and log agree again.

Sixteen client threads spawn back to back (each spawn appends two entries, and the tree
crosses several tile boundaries); the server is killed with SIGKILL while answers are
still coming. Every answered spawn named its entries in ``Audit-Seq``. After a restart,
each of those entries is proven in the signed tree, a witness that saw the log before the
burst finds it consistent, and the root is the one pymerkle computes from the stored
lines: nothing acknowledged was lost, and the tiles recovered to exactly the log.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pymerkle import InclusionProof, InmemoryTree

from actors.journal.merkle import leaf_hash
from actors.journal.note import Verifier, open_checkpoint
from conftest import UNLIMITED, LiveServer, audit_lines, bearer, vm_tenant

BODY = json.dumps({"vcpus": 1, "memory_mib": 16, "image": "burst"}).encode()
THREADS, SPAWNS, KILL_AFTER = 16, 320, 180


def burst(url: str, token: str, server: LiveServer) -> list[list[int]]:
    """Spawn from many threads; kill -9 the server after KILL_AFTER answers. The Audit-Seq
    of every 201 (its connections are plain sockets, closed whatever happens)."""
    address = urlsplit(url)
    receipts: list[list[int]] = []
    lock = threading.Lock()
    left = iter(range(SPAWNS))

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            try:
                connection.request(
                    "POST", "/v1/vms", BODY,
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )  # fmt: skip
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                return  # the server is gone (also in the middle of an answer)
            finally:
                connection.close()
            with lock:
                if response.status == 201:
                    receipts.append([int(s) for s in response.getheader("Audit-Seq").split(",")])
                if len(receipts) == KILL_AFTER:
                    assert server.proc is not None
                    server.proc.kill()

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return receipts


def test_kill_9_in_a_burst_leaves_a_tree_that_proves_every_acknowledged_entry(
    tmp_path: Path,
) -> None:
    # checkpoints (and so syncs of the tiles, beside the writer's appends) every 50 ms:
    # the restart trusts what was synced and rebuilds the rest from the log
    env = {**UNLIMITED, "VM_TENANT_CHECKPOINT_INTERVAL": "0.05"}
    server = LiveServer(tmp_path / "data", env=env).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            quota = {"vcpus": 10_000, "memory_mib": 10**6, "vms": 10_000}
            created = client.post(
                "/v1/admin/tenants", json={"id": "burst", "quota": quota},
                headers=bearer(server.admin_token),
            )  # fmt: skip
            token = created.json()["token"]
            key_text = client.get("/v1/audit/key", headers=bearer(token)).text
        key_file = tmp_path / "log.vkey"
        key_file.write_text(key_text)
        state = tmp_path / "witness.state"
        witness = (
            "witness", "--token", token, "--log-key", f"@{key_file}", "--state", str(state),
            "--once",
        )  # fmt: skip
        assert vm_tenant(*witness, "--url", server.url).returncode == 0

        receipts = burst(server.url, token, server)
        assert len(receipts) >= KILL_AFTER
        server.kill()
        server.start()

        log_key = Verifier.parse(key_text)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            tree, _ = open_checkpoint(
                client.get("/v1/audit/checkpoint", headers=bearer(token)).text, log_key
            )
            # (operations the kill left in doubt may be settled meanwhile: more lines)
            lines = audit_lines(server.data_dir)
            assert len(lines) >= tree.size > 2 * KILL_AFTER
            reference = InmemoryTree(algorithm="sha256")
            for line in lines[: tree.size]:
                reference.append_entry(line)
            assert reference.get_root(tree.size) == tree.root
            for seqs in receipts:
                assert len(seqs) == 2
                for seq in seqs:
                    stored = json.loads(lines[seq - 1])
                    assert stored["seq"] == seq and stored["op"] == "vm.spawn"
                    answer = client.get(
                        "/v1/audit/proof", params={"seq": seq}, headers=bearer(token)
                    ).json()
                    path = [base64.b64decode(h) for h in answer["hashes"]]
                    leaf = leaf_hash(lines[seq - 1])
                    rule = reference.prove_inclusion(seq, tree.size).rule
                    proof = InclusionProof("sha256", True, tree.size, seq, rule, [leaf, *path])
                    proof.verify(leaf, tree.root, index=seq, size=tree.size)
        # the witness that saw the log before the burst finds it consistent now
        after = vm_tenant(*witness, "--url", server.url)
        assert after.returncode == 0, after.stderr
        assert int(after.stdout.split()[1]) >= tree.size
    finally:
        server.kill()
