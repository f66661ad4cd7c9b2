"""A spawn flood from one tenant, in a process of its own (for the live fairness test).

Usage: ``python tests/flood.py URL CONCURRENCY RATE`` with the tenant's token in
``FLOOD_TOKEN``. ``CONCURRENCY`` workers send ``POST /v1/vms`` back to back, paced to
``RATE`` requests/s in total, while flooding is on. Commands on stdin, one a line: ``on``
and ``off`` (each acknowledged on stdout with the same word; ``off`` only once no request
is in flight any more); end of input stops the flood, prints the count of answers per
status as one JSON line and exits.

It runs apart from the test so that its client work never delays the measuring client's
event loop or holds its GIL: the only thing the two share is the server under test.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import httpx
import trio

SPEC = {"vcpus": 1, "memory_mib": 16, "image": "flood"}


class Flood:
    """The on/off switch the workers wait on, and what they saw."""

    def __init__(self) -> None:
        self.on = False
        self.busy = 0
        self.counts: Counter[int] = Counter()
        self._changed = trio.Event()

    def switch(self, on: bool) -> None:
        self.on = on
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, on: bool) -> None:
        while self.on != on:
            await self._changed.wait()

    async def wait_idle(self) -> None:
        while self.busy:
            await trio.sleep(0.001)


async def worker(flood: Flood, client: httpx.AsyncClient, pause: float) -> None:
    headers = {"Authorization": f"Bearer {os.environ['FLOOD_TOKEN']}"}
    while True:
        await flood.wait_until(True)
        flood.busy += 1
        try:
            response = await client.post("/v1/vms", json=SPEC, headers=headers)
        finally:
            flood.busy -= 1
        flood.counts[response.status_code] += 1
        await trio.sleep(pause)


def say(word: str) -> None:
    print(word, flush=True)


async def main(url: str, concurrency: int, rate: float) -> None:
    flood = Flood()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    limits = httpx.Limits(max_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client,
        trio.open_nursery() as nursery,
    ):
        for _ in range(concurrency):
            nursery.start_soon(worker, flood, client, concurrency / rate)
        say("ready")
        buffer = b""
        while chunk := await stdin.receive_some():
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode().strip()
                if command == "on":
                    flood.switch(True)
                elif command == "off":
                    flood.switch(False)
                    await flood.wait_idle()
                say(command)
        nursery.cancel_scope.cancel()
    await stdin.aclose()
    print(json.dumps({str(status): n for status, n in sorted(flood.counts.items())}), flush=True)


if __name__ == "__main__":
    # The flood's own client work is not what is measured; on a small machine it must not
    # take the CPU from the server or the measuring client.
    os.nice(19)
    trio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
