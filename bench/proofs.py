"""Cost of the Merkle tree, in CPU time of this process (not wall time).

``python -m bench.proofs [--leaves N] [--dir DIR]`` builds a log of N realistic stored
lines in memory, then measures, in one run:

- the verifier's root recomputation over stored lines (leaf hash + frontier), entries/s;
- appending the N leaf hashes through the frontier and the tiles (batches of 64), per leaf;
- :meth:`TileLog.sync` at N;
- inclusion and consistency proofs at N from a reopened tree (empty tile cache, tiles
  read from the page cache), per proof: mean and worst;

and prints one JSON object. CPU time (``time.process_time``) is used so that other load
on the machine changes the figures little; compare figures of one run with each other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path

from actors.journal.merkle import (
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
)
from actors.journal.segments import segment_name
from actors.journal.tiles import TileLog

BATCH = 64


def stored_lines(count: int, tenants: int = 97) -> list[bytes]:
    """Lines shaped like the audit log's (about 330 bytes each, a real hash chain), of
    ``tenants`` tenants in turn."""
    lines = []
    prev = "0" * 64
    for seq in range(1, count + 1):
        entry = {
            "detail": {"image": "debian-12", "memory_mib": 2048, "name": f"web-{seq}", "vcpus": 2},
            "op": "vm.spawn",
            "outcome": "requested",
            "prev": prev,
            "request_id": f"{seq:032x}",
            "seq": seq,
            "source": {"ip": "127.0.0.1", "token_id": "tok-0123456789abcdef"},
            "tenant": f"tenant-{seq % tenants}",
            "ts": "2026-12-01T10:00:00.123456Z",
            "vm": f"vm-{seq:024x}",
        }
        body = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(body).hexdigest()
        lines.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}')
    return lines


def write_segments(audit_dir: Path, lines: list[bytes], segment_bytes: int = 16 << 20) -> None:
    """``lines`` as the audit writer stores them: segments named by their first seq,
    rolled once they hold ``segment_bytes``."""
    audit_dir.mkdir(parents=True, exist_ok=True)
    segment = None
    size = segment_bytes
    try:
        for seq, line in enumerate(lines, start=1):
            if size >= segment_bytes:
                if segment is not None:
                    segment.close()
                segment = (audit_dir / segment_name(seq)).open("wb")
                size = 0
            segment.write(line + b"\n")
            size += len(line) + 1
    finally:
        if segment is not None:
            segment.close()


def _cpu(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(leaves: int, directory: Path, probes: int = 2000) -> dict[str, float]:
    lines = stored_lines(leaves)
    frontier = Frontier()
    sha = hashlib.sha256
    roots_s = _cpu(lambda: frontier.extend(sha(b"\x00" + line).digest() for line in lines))
    hashes = [leaf_hash(line) for line in lines]

    log = TileLog.open(directory, 0, lambda first: iter(()))

    def append_all() -> None:
        for at in range(0, leaves, BATCH):
            log.append(hashes[at : at + BATCH])

    append_s = _cpu(append_all)
    sync_s = _cpu(log.sync)
    assert log.root() == frontier.root()

    reopened = TileLog.open(directory, leaves, lambda first: iter(lines[first:]))
    view = reopened.view()
    rnd = random.Random(1)
    inclusion, consistency = [], []
    for _ in range(probes):
        index = rnd.randrange(leaves)
        inclusion.append(_cpu(lambda index=index: inclusion_proof(view, index, leaves)))
        old = rnd.randint(1, leaves)
        consistency.append(_cpu(lambda old=old: consistency_proof(view, old, leaves)))
    return {
        "leaves": leaves,
        "verifier_roots_entries_per_s": leaves / roots_s,
        "verifier_roots_us_per_entry": roots_s / leaves * 1e6,
        "append_us_per_leaf": append_s / leaves * 1e6,
        "sync_ms": sync_s * 1e3,
        "inclusion_ms_mean": sum(inclusion) / probes * 1e3,
        "inclusion_ms_max": max(inclusion) * 1e3,
        "consistency_ms_mean": sum(consistency) / probes * 1e3,
        "consistency_ms_max": max(consistency) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the tiles go (a temp dir)")
    args = parser.parse_args()
    if args.dir is not None:
        print(json.dumps(measure(args.leaves, args.dir), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(args.leaves, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
