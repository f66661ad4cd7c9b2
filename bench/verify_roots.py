"""What recomputing the Merkle roots costs ``vm-tenant audit verify``.

``python -m bench.verify_roots [--entries N] [--dir DIR]`` writes a data dir of N
realistic stored lines (16 MiB segments, a signed checkpoint every 1,000 entries, with
size, root and note), then verifies it three ways, in one run:

- ``chain``: the checkpoints without their roots (what verify did before the tree);
- ``inline``: with the roots, computed in the same process after the chain;
- ``parallel``: with the roots, computed in a second process while this one checks the
  chain (what ``verify_data_dir`` does on a log of 64 MiB or more).

For each: entries/s of wall time, and the CPU seconds of this process and of its
children (``os.times``), so that the split between the two cores shows. Wall time on a
shared machine varies; the CPU figures of one run compare with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.journal import verify
from actors.journal.checkpoint import CheckpointSigner, checkpoints_path
from actors.journal.merkle import Frontier, leaf_hash
from bench.proofs import stored_lines, write_segments

EVERY = 1000


def build(data_dir: Path, entries: int) -> None:
    """Segments of stored lines and a checkpoint every EVERY entries (and at the end)."""
    lines = stored_lines(entries)
    write_segments(data_dir / "audit", lines)
    signer = CheckpointSigner(data_dir)
    frontier = Frontier()
    for seq, line in enumerate(lines, start=1):
        frontier.append(leaf_hash(line))
        if seq % EVERY == 0 or seq == entries:
            head = json.loads(line)["hash"]
            signer.append(signer.sign(seq, head, "2026-12-01T10:00:00.000000Z", frontier.root()))


def strip_roots(data_dir: Path) -> bytes:
    """Remove size, root and note from the stored checkpoints; returns the original file."""
    path = checkpoints_path(data_dir)
    original = path.read_bytes()
    kept = [
        json.dumps({k: v for k, v in json.loads(line).items() if k not in ("size", "root", "note")})
        for line in original.splitlines()
    ]
    path.write_text("".join(f"{line}\n" for line in kept))
    return original


def timed(data_dir: Path) -> dict[str, float]:
    before, start = os.times(), time.perf_counter()
    report = verify.verify_data_dir(data_dir)
    wall, after = time.perf_counter() - start, os.times()
    assert report.verdict == "ok", report
    return {
        "entries_per_s": round(report.entries / wall),
        "wall_s": round(wall, 3),
        "cpu_self_s": round(after.user + after.system - before.user - before.system, 3),
        "cpu_children_s": round(
            after.children_user
            + after.children_system
            - before.children_user
            - before.children_system,
            3,
        ),
    }


def measure(data_dir: Path, entries: int) -> dict[str, Any]:
    build(data_dir, entries)
    original = strip_roots(data_dir)
    chain = timed(data_dir)
    checkpoints_path(data_dir).write_bytes(original)
    verify.PARALLEL_BYTES = 1 << 62
    inline = timed(data_dir)
    verify.PARALLEL_BYTES = 0
    parallel = timed(data_dir)
    return {"entries": entries, "chain": chain, "inline": inline, "parallel": parallel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the data dir goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(json.dumps(measure(Path(tmp) / "data", args.entries), indent=2))


if __name__ == "__main__":
    main()
