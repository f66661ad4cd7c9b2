"""CPU per request of the proxy, for builds compared in one run (``bench/README.md``).

Throughput on a shared two-core machine moves with whatever else runs; the CPU time the
server process spends per answer moves much less. For each source tree given
(``--tree LABEL=PATH``, e.g. the current tree and a ``git worktree`` of an older commit),
this starts ``vm-tenant serve`` from that tree (embedded fleet, limits off, pinned like
``bench.run``), provisions one tenant, drives one scenario with wrk for ``--seconds``, and
divides the server's user + system CPU over that window by the answers wrk counted.
Trees take turns, round after round, so a drift of the machine hits them alike; the
report gives each tree's median and its ratio to the first tree.

    .venv/bin/python -m bench.cpu --tree before=/tmp/old --tree after=. --scenario spawn

A tree named ``floor`` (``--tree floor=floor``) is the bare Quart-Trio app the bench
compares against (``bench/floor_app.py``), for the proxy's CPU as a multiple of it. A tree
named ``no-merkle`` (``--tree off=no-merkle``) is this tree without the Merkle tree
(``bench/without_tree.py``), for what the tree costs:

    .venv/bin/python -m bench.cpu --tree on=. --tree off=no-merkle --connections 64

``--profile`` adds a py-spy summary of each tree's last round (CPU samples by package and
the busiest functions; ``.venv/bin/pip install py-spy``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.profile import find_py_spy, start_recording, summarise
from bench.provision import Entry, provision, write_data_file
from bench.servers import ROOT, Server, detect_pinning, free_port, start_floor, start_server
from bench.wrk import find_wrk, run_wrk, wrk_command

#: ``--tree floor=floor`` measures the bare Quart-Trio app of ``bench/floor_app.py``
FLOOR = "floor"
#: ``--tree off=no-merkle`` measures this tree with the Merkle tree off
NO_TREE = "no-merkle"


def start_tree(tree: Path, workdir: Path, name: str) -> Server:
    if tree.name == FLOOR:
        floor = start_floor(workdir, detect_pinning(), trace=False)
        (workdir / name).mkdir()
        (workdir / name / "admin.token").write_text("floor")
        return floor
    port = free_port()
    module, cwd = ("bench.without_tree", ROOT) if tree.name == NO_TREE else ("server.cli", tree)
    argv = [sys.executable, "-m", module, "serve", "--data-dir", str(workdir / name)]
    argv += ["--bind", f"127.0.0.1:{port}", "--fleet", "embedded"]
    argv += ["--rate-limit", "0", "--max-inflight-spawns", "0"]
    return start_server(
        name, argv, port, "/readyz", workdir, detect_pinning(), trace=False, cwd=cwd
    )


def measure(
    tree: Path,
    workdir: Path,
    name: str,
    scenario: str,
    connections: int,
    seconds: int,
    profile: bool = False,
) -> float:
    """Milliseconds of server CPU per answer for one round (and a py-spy summary)."""
    wrk = find_wrk()
    if wrk is None:
        raise SystemExit("wrk is not on PATH (apt-get install -y wrk)")
    server = start_tree(tree, workdir, name)
    try:
        admin = (workdir / name / "admin.token").read_text().strip()
        if tree.name == FLOOR:  # nothing to provision: it answers any token and id
            entries = [Entry("solo", "floor", f"vm-{n}") for n in range(20)]
        else:
            entries = provision(server.url, admin, ["solo"], 20)
        data = write_data_file(workdir / f"{name}.txt", entries)
        command = wrk_command(
            wrk, scenario, server.url, connections, seconds, detect_pinning().load
        )
        recorder, raw = None, workdir / f"{name}.raw"
        py_spy = find_py_spy()
        if profile and py_spy is not None:
            recorder = start_recording(py_spy, server.pid, seconds, raw, pin=detect_pinning().load)
        user, system = server.cpu_seconds()
        result = run_wrk(command, data, seconds)
        user_after, system_after = server.cpu_seconds()
        if recorder is not None:
            recorder.wait(timeout=seconds + 30)
            print(summarise(raw, requests=result.requests), flush=True)
        if result.non_2xx or result.errors:
            raise SystemExit(f"{name}: {result.non_2xx} non-2xx, {result.errors} errors")
        return 1000 * (user_after - user + system_after - system) / result.requests
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="LABEL=PATH")
    parser.add_argument("--scenario", default="spawn", choices=["spawn", "status", "pairs"])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="py-spy summary of each tree's last round"
    )
    args = parser.parse_args()
    trees = [(label, Path(path).resolve()) for label, path in (t.split("=", 1) for t in args.tree)]
    samples: dict[str, list[float]] = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory(prefix="vm-tenant-cpu-") as tmp:
        for round_ in range(args.rounds):
            for label, tree in trees:
                name = f"{label}-{round_}"
                last = args.profile and round_ == args.rounds - 1
                ms = measure(
                    tree, Path(tmp), name, args.scenario, args.connections, args.seconds, last
                )
                samples[label].append(ms)
                print(f"{name}: {ms:.3f} ms CPU per answer", flush=True)
    first = statistics.median(samples[trees[0][0]])
    report = {
        label: {
            "median_ms": round(statistics.median(values), 3),
            "ratio": round(statistics.median(values) / first, 3),
            "samples": [round(v, 3) for v in values],
        }
        for label, values in samples.items()
    }
    print(json.dumps({"scenario": args.scenario, "connections": args.connections, **report}))


if __name__ == "__main__":
    main()
