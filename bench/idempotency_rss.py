"""RSS of a real server under quota-refused spawns with fresh Idempotency-Keys.

``python -m bench.idempotency_rss [--requests 30000] [--concurrency 32]`` starts
``vm-tenant serve`` on a fresh data dir (per-tenant limits off), provisions a tenant whose
quota admits no VM, and sends spawns that are all refused, each with a key of its own (a
full tenant retrying with new keys). It reads the server's ``VmRSS`` from ``/proc`` after
a warm-up of 1,000 such requests and after every ``--step`` measured ones, and prints one
JSON line: the readings, the growth over all of them and per request, and the growth of
the last step (which shows whether memory still grows, or has levelled off). Snapshots
are compacted once an hour only: a compaction holds a second copy of the state while it
runs, which would show in a reading as growth that is not kept.

The server is started with this interpreter; set ``PYTHONPATH`` to a checkout of another
revision to measure that one with the same dependencies (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import trio

LISTEN_RE = re.compile(r"vm-tenant listening on (http://[^\s\"]+)")
SPEC = {"vcpus": 1, "memory_mib": 64, "image": "debian-12"}
WARM_UP = 1000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    argv = [
        sys.executable, "-m", "server.cli", "serve", "--data-dir", str(data_dir),
        "--bind", "127.0.0.1:0", "--rate-limit", "0", "--max-inflight-spawns", "0",
        "--log-format", "json", "--log-level", "warning", "--snapshot-interval", "3600",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not found and (match := LISTEN_RE.search(line)):
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(60)
    if not found:
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, found[0]


async def refuse(url: str, token: str, keys: range, concurrency: int) -> None:
    """Send one refused spawn per key, ``concurrency`` at a time."""
    headers = {"Authorization": f"Bearer {token}"}
    pending = iter(keys)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for n in pending:
                response = await client.post(
                    "/v1/vms", json=SPEC, headers={**headers, "Idempotency-Key": f"k-{n}"}
                )
                assert response.status_code == 403, response.text

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)


async def measure(requests: int, concurrency: int, step: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="vm-tenant-rss-") as tmp:
        data_dir = Path(tmp) / "data"
        proc, url = start(data_dir)
        try:
            admin = {"Authorization": f"Bearer {(data_dir / 'admin.token').read_text().strip()}"}
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                body = {"id": "full", "quota": {"vcpus": 0, "memory_mib": 0, "vms": 0}}
                created = await client.post("/v1/admin/tenants", json=body, headers=admin)
                created.raise_for_status()
                token = created.json()["token"]
            await refuse(url, token, range(WARM_UP), concurrency)
            readings = [rss_bytes(proc.pid)]
            for first in range(WARM_UP, WARM_UP + requests, step):
                await refuse(
                    url, token, range(first, min(first + step, WARM_UP + requests)), concurrency
                )
                readings.append(rss_bytes(proc.pid))
        finally:
            proc.terminate()
            proc.wait(60)
    growth = readings[-1] - readings[0]
    return {
        "requests": requests,
        "step": step,
        "rss": readings,
        "growth": growth,
        "growth_per_request": round(growth / requests, 1),
        "last_step_growth": readings[-1] - readings[-2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--step", type=int, default=10_000)
    args = parser.parse_args(argv)
    result = trio.run(measure, args.requests, args.concurrency, args.step)
    print(json.dumps({**result, "pythonpath": os.environ.get("PYTHONPATH", "")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
