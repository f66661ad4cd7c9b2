"""The Merkle tree as the audit writer keeps it: in step with the durable log, always.

The writer appends each batch's leaves after its fsync and before its tickets resolve;
a tile that cannot be written leaves the tree behind (never a failed write), and the next
batch, or a sync, rebuilds it from the log. Sync runs in another thread than the appends.
Every check compares with a tree built independently from the stored lines (pymerkle).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from pymerkle import InmemoryTree

from actors.journal.merkle import MemoryTree, inclusion_proof, leaf_hash, root
from actors.journal.tiles import TileLog, _TileTree
from actors.journal.tree import LogTree
from actors.journal.writer import AuditWriter
from conftest import audit_lines

SOURCE = {"ip": "127.0.0.1", "token_id": "tok-test"}


def submit(writer: AuditWriter, n: int) -> Any:
    return writer.submit(
        op="tenant.update",
        outcome="succeeded",
        tenant="acme",
        vm=None,
        source=SOURCE,
        request_id=f"req-{n}",
        detail={"n": n, "text": "ünïcode ✓"},
    )


def pymerkle_root(lines: list[bytes]) -> bytes:
    """The RFC 9162 root of the stored lines, by a library that shares no code with ours."""
    tree = InmemoryTree(algorithm="sha256")
    for line in lines:
        tree.append_entry(line)
    root_hash: bytes = tree.get_root(len(lines))
    return root_hash


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "audit").mkdir()
    return tmp_path


def open_tree(data_dir: Path, size: int = 0) -> LogTree:
    tree = LogTree(data_dir / "tree", data_dir / "audit")
    tree.open(size)
    return tree


async def run_writer(
    writer: AuditWriter, count: int, first: int = 0, *, covered: bool = True
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        tickets = [submit(writer, n) for n in range(first, first + count)]
        for ticket in tickets:
            entry = await ticket.wait()
            # acknowledged means in the tree: the published view covers the entry
            view = writer.tree_view
            assert not covered or (view is not None and view.size >= entry["seq"])
        writer.close()


async def test_each_batch_is_in_the_tree_before_it_is_acknowledged(data_dir: Path) -> None:
    tree = open_tree(data_dir)
    writer = AuditWriter(data_dir / "audit", tree=tree, segment_bytes=4000)
    await run_writer(writer, 600)
    lines = audit_lines(data_dir)
    assert len(lines) == writer.seq == 600
    view = writer.tree_view
    assert view is not None and view.size == 600
    assert view.root() == pymerkle_root(lines)
    reference = MemoryTree(leaf_hash(line) for line in lines)
    for size in (1, 255, 256, 257, 600):
        assert root(view, size) == pymerkle_root(lines[:size])
        for index in (0, size // 2, size - 1):
            assert inclusion_proof(view, index, size) == inclusion_proof(reference, index, size)


async def test_a_tile_that_cannot_be_written_leaves_the_tree_behind_then_catches_up(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = open_tree(data_dir)
    writer = AuditWriter(data_dir / "audit", tree=tree)
    await run_writer(writer, 300)
    assert writer.tree_view is not None and writer.tree_view.size == 300

    def no_space(self: TileLog, leaves: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(TileLog, "append", no_space)
        writer = AuditWriter(data_dir / "audit", 300, writer.head, tree=tree)
        await run_writer(writer, 5, covered=False)
    # every write was acknowledged; the tree stayed at what it could show
    assert writer.seq == 305
    assert writer.tree_view is not None and writer.tree_view.size == 300
    # the next batch rebuilds it from the log
    await run_writer(writer := AuditWriter(data_dir / "audit", 305, writer.head, tree=tree), 1, 5)
    assert writer.tree_view is not None and writer.tree_view.size == 306
    assert writer.tree_view.root() == pymerkle_root(audit_lines(data_dir))


async def test_a_sync_catches_a_tree_up_without_a_write(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = open_tree(data_dir)
    writer = AuditWriter(data_dir / "audit", tree=tree)

    def no_space(self: TileLog, leaves: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(TileLog, "append", no_space)
        await run_writer(writer, 3, covered=False)
    assert tree.size == 0
    assert tree.sync() == 3
    view = tree.view()
    assert view is not None and view.root() == pymerkle_root(audit_lines(data_dir))


def test_syncs_in_another_thread_while_appending_keep_the_tree_whole(tmp_path: Path) -> None:
    """The writer's thread appends while the upkeep's thread syncs, many times over; after
    each sync, reopening the directory gives the reference tree."""
    lines = [b'{"seq":%d,"pad":"%s"}' % (i + 1, b"x" * (i % 13)) for i in range(6000)]
    leaves = [leaf_hash(line) for line in lines]
    tiles = TileLog.open(tmp_path / "tree", 0, lambda first: iter(lines[first:0]))
    stop = threading.Event()
    synced: list[int] = []
    errors: list[BaseException] = []

    def syncing() -> None:
        try:
            while not stop.is_set():
                synced.append(tiles.sync())
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=syncing)
    thread.start()
    try:
        at = 0
        for step in range(1, 200):
            batch = leaves[at : at + step % 97 + 1]
            tiles.append(batch)
            at += len(batch)
            if at >= len(leaves):
                break
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len(synced) > 1 and synced == sorted(synced)
    size = tiles.sync()
    reopened = TileLog.open(tmp_path / "tree", size, lambda first: iter(lines[first:size]))
    reference = MemoryTree(leaves[:size])
    assert reopened.root() == reference.root()
    assert inclusion_proof(reopened.view(), size // 3, size) == inclusion_proof(
        reference, size // 3, size
    )
    # no partial tile but the current ones is left
    partials = {p.parent.name for p in (tmp_path / "tree").rglob("*.p/*")}
    assert len(partials) <= 3


def test_reopening_an_unchanged_tree_writes_nothing(tmp_path: Path) -> None:
    lines = [b'{"seq":%d}' % (i + 1) for i in range(700)]
    TileLog.open(tmp_path / "tree", 700, lambda first: iter(lines[first:]))

    def state() -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(tmp_path)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (tmp_path / "tree").rglob("*")
        }

    before = state()
    TileLog.open(tmp_path / "tree", 700, lambda first: iter(lines[first:]))
    assert state() == before


def test_a_tiles_inner_levels_are_computed_once_when_threads_race() -> None:
    """Proofs run in several worker threads over the same cached tile: the levels inside
    it must come out right however the threads interleave (switching every microsecond)."""
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(256)]
    reference = MemoryTree(leaves)
    want = [reference.hashes([(level, 0)])[0] for level in range(9)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(30):
            tile = _TileTree(b"".join(leaves))
            got: list[list[bytes]] = []
            barrier = threading.Barrier(6)

            def climb(
                tile: _TileTree = tile,
                barrier: threading.Barrier = barrier,
                got: list[list[bytes]] = got,
            ) -> None:
                barrier.wait()
                got.append([tile.node(level, 0) for level in range(9)])

            threads = [threading.Thread(target=climb) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert got == [want] * 6
    finally:
        sys.setswitchinterval(interval)
