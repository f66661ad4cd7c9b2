"""The tenant's walk-through in the README runs as written, against a real server.

Its shell block is executed by bash with ``set -euo pipefail`` (every line must succeed)
in a directory whose ``vm-tenant-data`` is the server's data dir, with ``vm-tenant`` on
the ``PATH`` and ``VM_TENANT_URL`` pointing at the server's ephemeral port (the block
keeps a ``VM_TENANT_URL`` that is set). What it prints is then checked against the log.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from actors.journal.note import Verifier, open_checkpoint
from conftest import LiveServer, audit_lines, run_pasted

ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## For a tenant: keep receipts, prove them later\n", 1)[1]
    found = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert found, "the README lost the tenant's walk-through"
    return found.group(1)


def test_the_walkthrough_has_no_placeholders() -> None:
    script = walkthrough()
    assert not re.search(r"<[a-z][^>]*>", script), "a placeholder cannot be pasted"
    assert "vm-tenant audit check" in script and "vm-tenant witness" in script


def test_the_tenants_walkthrough_runs_as_pasted(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "vm-tenant-data").start()
    try:
        result = run_pasted(walkthrough(), server, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        stored = [json.loads(line) for line in audit_lines(server.data_dir)]
        # the receipt named the spawn's requested entry; its proof and the entry were shown
        receipt = re.search(r"^spawn requested as entry (\d+)$", out, re.M)
        assert receipt is not None, out
        seq = int(receipt.group(1))
        assert (stored[seq - 1]["op"], stored[seq - 1]["outcome"]) == ("vm.spawn", "requested")
        assert "receipt-demo" in json.dumps(stored[seq - 1]["detail"])
        assert f'"seq":{seq},' in out.replace(" ", "")
        verified = re.search(r"^verified (\d+) entries in tree (\d+)$", out, re.M)
        assert verified and int(verified.group(1)) == 3  # creation, requested, succeeded
        rounds = re.findall(r"^consistent (\d+) \S+$", out, re.M)
        assert [int(size) for size in rounds] == [3, 5]
        key = Verifier.parse((tmp_path / "log.vkey").read_text())
        kept, _ = open_checkpoint((tmp_path / "witness.state").read_text(), key)
        assert kept.size == 5 == len(stored)
    finally:
        server.kill()
