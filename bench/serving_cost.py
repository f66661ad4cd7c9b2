"""What our serving layer costs per request, against plain ``hypercorn.trio.serve``.

One app (``bench.floor_app``, the bare Quart-Trio app with the proxy's routes), served two
ways in turn: by ``hypercorn.trio.serve`` and by ``server.serving.serve`` (deadlines,
ceilings, the single-writer connections). ``wrk`` sends the same status request
(``GET /v1/vms/ID``) over the same keep-alive connections to each, and the server
process's CPU time (user + sys, from ``/proc/PID/stat``) is divided by the requests it
answered. The figure is the ratio guarded / plain of CPU per request, one per round, in
one run, so that what the machine is doing meanwhile weighs on both alike.

Usage: ``python -m bench.serving_cost [--rounds 5] [--seconds 3] [--connections 16]``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from functools import partial

PATH = "/v1/vms/vm-0123456789abcdef0123456789abcdef"
TICK = os.sysconf("SC_CLK_TCK")


def serve(variant: str, port: int) -> None:
    """Run the floor app on 127.0.0.1:``port`` until killed."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from bench.floor_app import app
    from server.serving import Endpoint, ServingOptions
    from server.serving import serve as guarded_serve

    never = trio.Event()
    if variant == "plain":
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        trio.run(partial(hypercorn_serve, app, config, shutdown_trigger=never.wait))
    else:
        endpoints = [Endpoint(app, f"127.0.0.1:{port}")]
        trio.run(partial(guarded_serve, endpoints, ServingOptions(), shutdown_trigger=never.wait))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def measure(variant: str, seconds: int, connections: int) -> float:
    """CPU microseconds per request of one server run."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.serving_cost", "serve", variant, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(port)
        url = f"http://127.0.0.1:{port}{PATH}"
        # Warm up (imports, first connections), then measure a run of its own.
        subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", url], capture_output=True)
        before = cpu_seconds(server.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        used = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait()
    match = re.search(r"(\d+) requests in", out)
    if not match or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk did not get clean answers:\n{out}")
    return used / int(match.group(1)) * 1e6


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.serving_cost")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    ratios = []
    for index in range(args.rounds):
        plain = measure("plain", args.seconds, args.connections)
        guarded = measure("guarded", args.seconds, args.connections)
        ratios.append(guarded / plain)
        print(
            f"round {index + 1}: plain {plain:.1f} us/request, guarded {guarded:.1f} "
            f"us/request, ratio {guarded / plain:.3f}",
            flush=True,
        )
    print(f"median ratio guarded / plain: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
