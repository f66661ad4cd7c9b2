"""The walk-through of ``docs/cli.md`` and its Python client example run as written.

Its shell block is executed by bash with ``set -euo pipefail`` (every line must
succeed), in a directory whose ``vm-tenant-data`` is the server's data dir, with only
``VM_TENANT_URL`` pointing at the server's ephemeral port; then the Python example runs
in the same directory against the same server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import LiveServer, bearer

ROOT = Path(__file__).resolve().parents[2]


def block(heading: str, language: str) -> str:
    """The first ``language`` code block under ``heading`` in docs/cli.md."""
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    found = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert found, f"docs/cli.md lost its {heading} example"
    return found.group(1)


def walkthrough() -> str:
    return block("Walk-through", "sh")


def test_the_walkthrough_has_no_placeholders() -> None:
    script = walkthrough()
    assert not re.search(r"<[a-z][^>]*>", script), "a placeholder cannot be pasted"
    assert "vm-tenant" in script


def test_the_walkthrough_runs_as_pasted(tmp_path: Path) -> None:
    # The head is signed every checkpoint interval; a short one stands in for the time a
    # person takes between the first write and `audit head`.
    server = LiveServer(tmp_path / "vm-tenant-data", env={"VM_TENANT_CHECKPOINT_INTERVAL": "0.1"})
    server.start()
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("VM_TENANT_")}
        environ["VM_TENANT_URL"] = server.url
        environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}"
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough()],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert re.search(r"^intact: \d+ entries, head \d+:[0-9a-f]{64}$", result.stdout, re.M)
        tenant = httpx.get(
            f"{server.url}/v1/admin/tenants/acme", headers=bearer(server.admin_token)
        ).json()
        assert tenant["quota"] == {"vcpus": 16, "memory_mib": 32768, "vms": 8}
        assert tenant["allocated"]["vms"] == 0  # the VM was destroyed

        # the Python client's example, in the same directory, against the same server
        example = subprocess.run(
            [sys.executable, "-c", block("The Python client", "python")],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert example.returncode == 0, example.stdout + example.stderr
        assert example.stdout.splitlines()[-1] == "404 not_found"
        assert re.fullmatch(r"vm-[0-9a-f]+ (pending|running)", example.stdout.splitlines()[0])
    finally:
        server.kill()
