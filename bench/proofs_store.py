"""The proof endpoints' cost at scale, through the store's code path (everything but HTTP).

``python -m bench.proofs_store [--entries N] [--tenants T] [--probes P] [--dir DIR]``
writes a data dir of N stored lines owned by T tenants and its tiles, opens the pieces
the file store runs on (the tree, the writer at that head, the checkpoint key, the
tenants' trail index rebuilt from the log as at a start), and then, in one run:

- opens the tree again over a synced directory (what a start pays);
- measures the trail index: entries/s of the rebuild, and its memory per entry
  (``tracemalloc``: the arrays and the dict, everything the index holds);
- calls ``FileStore.inclusion_proof`` (as a tenant, so with the ownership check),
  ``consistency_proof`` and ``trail`` P times each at random, and ``signed_head`` once
  fresh, measuring the wall time of each call (the worker-thread hop included) and
  the CPU time of the whole series.

Prints one JSON object. The machine is shared: compare CPU figures of one run, and read
wall times as an upper bound.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

from actors.journal.checkpoint import CheckpointSigner
from actors.journal.snapshot import Anchor, Loaded, Replayed
from actors.journal.tiles import TileLog
from actors.journal.trail import TrailIndex, scan_trails
from actors.journal.tree import LogTree
from actors.journal.writer import AuditWriter
from actors.state import ProxyState
from actors.store.file import FileStore, FileStoreConfig
from bench.proofs import stored_lines, write_segments


def build(data_dir: Path, entries: int, tenants: int) -> tuple[list[bytes], str]:
    """The segments and the synced tiles of N lines; the lines, and the head's hash."""
    lines = stored_lines(entries, tenants)
    write_segments(data_dir / "audit", lines)
    TileLog.open(data_dir / "tree", entries, lambda first: iter(lines[first:]))
    return lines, json.loads(lines[-1])["hash"]


def owner(line: bytes) -> str:
    tenant: str = json.loads(line)["tenant"]
    return tenant


def measure(data_dir: Path, entries: int, tenants: int, probes: int) -> dict[str, Any]:
    lines, head = build(data_dir, entries, tenants)
    started = time.perf_counter()
    tree = LogTree(data_dir / "tree", data_dir / "audit")
    tree.open(entries)
    open_s = time.perf_counter() - started

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.process_time()
    trails = TrailIndex(ready=False)
    trails.merge(scan_trails(data_dir / "audit", entries))
    index_s = time.process_time() - started
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    writer = AuditWriter(data_dir / "audit", entries, head, tree=tree)
    replayed = Replayed(
        ProxyState(), Anchor(), Anchor(entries, head), Loaded(ProxyState(), Anchor())
    )
    config = FileStoreConfig(data_dir)
    store = FileStore(config, replayed, writer, CheckpointSigner(data_dir), "adm-x", tree)
    store.trails = trails
    rnd = random.Random(7)
    seqs = [rnd.randrange(1, entries + 1) for _ in range(probes)]
    olds = [rnd.randrange(1, entries + 1) for _ in range(probes)]
    results: dict[str, Any] = {}

    async def series(name: str, calls: list[Any]) -> None:
        walls = []
        cpu = time.process_time()
        for call in calls:
            start = time.perf_counter()
            await call()
            walls.append(time.perf_counter() - start)
        results[name] = {
            "cpu_ms_mean": round((time.process_time() - cpu) / len(calls) * 1e3, 3),
            "wall_ms_mean": round(statistics.fmean(walls) * 1e3, 3),
            "wall_ms_p99": round(sorted(walls)[int(len(walls) * 0.99)] * 1e3, 3),
            "wall_ms_max": round(max(walls) * 1e3, 3),
        }

    async def main() -> None:
        start = time.perf_counter()
        await store.signed_head()
        results["signed_head_fresh_ms"] = round((time.perf_counter() - start) * 1e3, 3)

        def proof(seq: int) -> Any:
            return lambda: store.inclusion_proof(seq, None, tenant=owner(lines[seq - 1]))

        await series("inclusion_proof", [proof(seq) for seq in seqs])
        consistency = [lambda old=old: store.consistency_proof(old, None) for old in olds]
        await series("consistency_proof", consistency)
        tenant_ids = sorted({owner(lines[seq - 1]) for seq in seqs})
        await series(
            "trail_page_of_100",
            [
                lambda t=t, s=s: store.trail(t, s, 100)
                for t, s in zip(rnd.choices(tenant_ids, k=probes), seqs, strict=True)
            ],
        )

    trio.run(main)
    return {
        "entries": entries,
        "tenants": len(trails._seqs),
        "tree_open_synced_s": round(open_s, 3),
        "trail_index_rebuild_per_s": round(entries / index_s),
        "trail_index_bytes_per_entry": round(index_bytes / entries, 2),
        **results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=97)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None, help="where the data dir goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        figures = measure(Path(tmp) / "data", args.entries, args.tenants, args.probes)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
