"""The README's walk-through, and the Python client's example of ``docs/cli.md``, run as
written.

The walk-through's shell blocks are executed by bash with ``set -euo pipefail`` (every
line must succeed), one after the other, in a directory whose ``vm-tenant-data`` is the
server's data dir. The server listens on an ephemeral port: ``VM_TENANT_URL`` points
there, and the literal ``http://127.0.0.1:8080`` of the curl lines is replaced by it
(the only change made to what a reader pastes). Then the Python example runs in the same
directory against the same server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import LiveServer, bearer, pasted_env, run_pasted

ROOT = Path(__file__).resolve().parents[2]


DEFAULT_URL = "http://127.0.0.1:8080"


def section(document: str, heading: str) -> str:
    """The text under ``## heading`` in ``document``, up to the next ``## ``."""
    text = (ROOT / document).read_text()
    assert f"\n## {heading}\n" in text, f"{document} lost its section {heading!r}"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def blocks(document: str, heading: str, language: str) -> list[str]:
    """Every ``language`` code block under ``heading`` in ``document``."""
    found = re.findall(rf"```{language}\n(.*?)```", section(document, heading), re.DOTALL)
    assert found, f"{document} lost its {heading} example"
    return found


def walkthrough() -> str:
    return "\n".join(blocks("README.md", "A walk-through", "sh"))


def python_example() -> str:
    return blocks("docs/cli.md", "The Python client", "python")[0]


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
        script = walkthrough().replace(DEFAULT_URL, server.url)
        result = run_pasted(script, server, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert re.search(r"^intact: \d+ entries, head \d+:[0-9a-f]{64}$", result.stdout, re.M)
        tenant = httpx.get(
            f"{server.url}/v1/admin/tenants/acme", headers=bearer(server.admin_token)
        ).json()
        assert tenant["quota"] == {"vcpus": 16, "memory_mib": 32768, "vms": 8}
        # web-1 was destroyed; web-2, spawned over plain HTTP, is listed and counted
        assert tenant["allocated"]["vms"] == 1
        assert len(re.findall(r'"name": ?"web-2"', result.stdout)) == 2  # the 201, the list

        # the Python client's example, in the same directory, against the same server
        example = subprocess.run(
            [sys.executable, "-c", python_example()],
            cwd=tmp_path,
            env=pasted_env(server),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert example.returncode == 0, example.stdout + example.stderr
        assert example.stdout.splitlines()[-1] == "404 not_found"
        assert re.fullmatch(r"vm-[0-9a-f]+ (pending|running)", example.stdout.splitlines()[0])
    finally:
        server.kill()
