"""The tree on disk as C2SP tlog-tiles: layout, contents, proofs, and recovery after crashes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.journal.merkle import (
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
)
from actors.journal.tiles import TILE_BYTES, TileDamaged, TileLog, tile_path


def lines(count: int, start: int = 0) -> list[bytes]:
    return [b'{"seq":%d,"x":"%s"}' % (i + 1, b"y" * (i % 7)) for i in range(start, start + count)]


LINES = lines(3000)
REFERENCE = MemoryTree(leaf_hash(line) for line in LINES)


def reader(log: list[bytes]):  # type: ignore[no-untyped-def]
    def read(first: int) -> Iterator[bytes]:
        yield from log[first:]

    return read


def files_under(directory: Path) -> set[str]:
    return {
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != "synced"
    }


def test_tile_paths_follow_the_spec() -> None:
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(0, 0) == "tile/0/000"
    assert tile_path(2, 1000) == "tile/2/x001/000"
    assert tile_path(1, 5, 17) == "tile/1/005.p/17"
    for bad in ((64, 0, 256), (0, -1, 256), (0, 0, 0), (0, 0, 257)):
        with pytest.raises(ValueError):
            tile_path(*bad)


def test_a_tree_of_70000_has_exactly_the_tiles_the_spec_lists(tmp_path: Path) -> None:
    # c2sp.org/tlog-tiles: "a tree of size 70,000 will be represented by 273 full level 0
    # tiles, one partial level 0 tile of width 112, one full level 1 tile, one partial
    # level 1 tile of width 17, and one partial level 2 tile of width 1"
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(i.to_bytes(4, "big")) for i in range(70_000))
    log.sync()
    expected = {tile_path(0, n) for n in range(273)}
    expected |= {tile_path(0, 273, 112), tile_path(1, 0), tile_path(1, 1, 17), tile_path(2, 0, 1)}
    assert files_under(tmp_path) == expected
    assert all(
        (tmp_path / p).stat().st_size == 32 * int(p.split("/")[-1]) for p in expected if ".p/" in p
    )
    assert (tmp_path / "synced").read_text() == "70000\n"


def test_tile_contents_are_the_spec_hashes(tmp_path: Path) -> None:
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES)
    log.sync()
    # MTH(D[(n * 256 + i) * 256**l : (n * 256 + i + 1) * 256**l]) for i in 0..255
    for level in (0, 1):
        span = 256**level
        for n in range(len(LINES) // (256 * span)):
            data = (tmp_path / tile_path(level, n)).read_bytes()
            want = b"".join(_mth(n * 256 + i, span) for i in range(256))
            assert data == want
    partial = (tmp_path / tile_path(0, 11, 3000 - 11 * 256)).read_bytes()
    assert partial == b"".join(leaf_hash(line) for line in LINES[11 * 256 :])


def _mth(index: int, span: int) -> bytes:
    level = span.bit_length() - 1
    return REFERENCE.hashes([(level, index)])[0]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=20), st.randoms(use_true_random=False))
def test_random_batches_give_the_reference_tree_and_proofs(
    tmp_path_factory: pytest.TempPathFactory, batches: list[int], rnd: random.Random
) -> None:
    directory = tmp_path_factory.mktemp("tree")
    log = TileLog.open(directory, 0, reader([]), cache_tiles=2)
    done = 0
    views = []
    for batch in batches:
        batch = min(batch, len(LINES) - done)
        log.append(leaf_hash(line) for line in LINES[done : done + batch])
        done += batch
        assert log.size == done
        assert log.root() == root(REFERENCE, done)
        views.append(log.view())
        if rnd.random() < 0.3:
            log.sync()
        if done == len(LINES):
            break
    # every view answers for its own size, also after the tree grew past it
    for view in views:
        size = view.size
        assert root(view, size) == root(REFERENCE, size)
        for _ in range(5):
            index = rnd.randrange(size)
            assert inclusion_proof(view, index, size) == inclusion_proof(REFERENCE, index, size)
            old = rnd.randint(1, size)
            assert consistency_proof(view, old, size) == consistency_proof(REFERENCE, old, size)


def test_a_view_refuses_nodes_beyond_its_size(tmp_path: Path) -> None:
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES[:300])
    view = log.view()
    with pytest.raises(LookupError):
        view.hashes([(0, 300)])
    with pytest.raises(LookupError):
        view.hashes([(9, 0)])


def test_a_damaged_full_tile_is_reported_not_trusted(tmp_path: Path) -> None:
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES[:600])
    path = tmp_path / tile_path(0, 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TileDamaged):
        inclusion_proof(log.view(), 300, 600)


# --- recovery ----------------------------------------------------------------------------


def _assert_matches_reference(log: TileLog, size: int, rnd: random.Random) -> None:
    assert log.size == size
    assert log.root() == root(REFERENCE, size)
    view = log.view()
    assert root(view, size) == root(REFERENCE, size)
    for _ in range(20):
        index = rnd.randrange(size)
        assert inclusion_proof(view, index, size) == inclusion_proof(REFERENCE, index, size)


def test_reopen_after_clean_sync_reads_only_the_tail(tmp_path: Path) -> None:
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES[:2000])
    log.sync()
    asked: list[int] = []

    def read(first: int) -> Iterator[bytes]:
        asked.append(first)
        yield from LINES[first:]

    again = TileLog.open(tmp_path, 2500, read)
    assert asked == [7 * 256]  # the last full level-0 tile below the synced size
    _assert_matches_reference(again, 2500, random.Random(1))


def test_reopen_when_the_log_is_shorter_than_the_tree(tmp_path: Path) -> None:
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES)
    log.sync()
    again = TileLog.open(tmp_path, 1000, reader(LINES))
    _assert_matches_reference(again, 1000, random.Random(2))
    assert not (tmp_path / tile_path(0, 4)).exists()  # tile 3 ends at 1024 > 1000
    grown = TileLog.open(tmp_path, 3000, reader(LINES))
    _assert_matches_reference(grown, 3000, random.Random(3))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(1, 2999),
    st.integers(0, 3000),
    st.randoms(use_true_random=False),
)
def test_power_loss_at_any_point_is_recovered(
    tmp_path_factory: pytest.TempPathFactory, synced_at: int, log_size: int, rnd: random.Random
) -> None:
    """Tiles written after the last sync may be missing, cut short or garbage; the log
    (at least as long as the synced tree, since the tree follows the log's fsync) rules."""
    directory = tmp_path_factory.mktemp("tree")
    log_size = max(log_size, synced_at)
    log = TileLog.open(directory, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES[:synced_at])
    log.sync()
    log.append(leaf_hash(line) for line in LINES[synced_at:log_size])
    # the crash: unsynced tiles are lost, cut or filled with garbage; partials vanish
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name == "synced" or ".p" in path.parts[-2]:
            continue
        index_start = _tile_start(directory, path)
        if index_start is not None and index_start + _tile_span(directory, path) <= synced_at:
            continue  # synced: the disk kept it
        fate = rnd.choice(["keep", "delete", "cut", "garbage"])
        if fate == "delete":
            path.unlink()
        elif fate == "cut":
            with path.open("r+b") as f:
                f.truncate(rnd.randrange(TILE_BYTES))
        elif fate == "garbage":
            path.write_bytes(os.urandom(TILE_BYTES))
    if rnd.random() < 0.5:
        for partial in list(directory.rglob("*.p")):
            for f in partial.iterdir():
                f.unlink()
    again = TileLog.open(directory, log_size, reader(LINES))
    _assert_matches_reference(again, log_size, rnd)
    # and the recovered tree is durable in its own right
    assert (directory / "synced").read_text() == f"{log_size}\n"


def _tile_start(directory: Path, path: Path) -> int | None:
    rel = path.relative_to(directory / "tile").parts
    if not rel[0].isdigit() or not rel[-1].isdigit():
        return None
    index = int("".join(p.lstrip("x") for p in rel[1:]))
    return index * _tile_span(directory, path)


def _tile_span(directory: Path, path: Path) -> int:
    level = int(path.relative_to(directory / "tile").parts[0])
    return 256 ** (level + 1)


def test_a_garbled_sync_marker_means_a_full_rebuild(tmp_path: Path) -> None:
    log = TileLog.open(tmp_path, 0, reader([]))
    log.append(leaf_hash(line) for line in LINES)
    log.sync()
    (tmp_path / "synced").write_text("12x\n")
    asked: list[int] = []

    def read(first: int) -> Iterator[bytes]:
        asked.append(first)
        yield from LINES[first:]

    _assert_matches_reference(TileLog.open(tmp_path, 3000, read), 3000, random.Random(4))
    assert asked == [0]


def test_a_log_that_yields_too_few_lines_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="yielded"):
        TileLog.open(tmp_path, 100, reader(LINES[:50]))


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from actors.journal.merkle import leaf_hash
    from actors.journal.tiles import TileLog

    directory, log_path = Path(sys.argv[1]), Path(sys.argv[2])
    log = TileLog.open(directory, 0, lambda first: iter(()))
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    seq = 0
    batch = 0
    while True:
        batch += 1
        count = 1 + (batch * 37) % 300
        data = [
            b'{"seq":%d,"x":"%s"}' % (seq + i + 1, b"y" * ((seq + i) % 7)) for i in range(count)
        ]
        os.write(fd, b"".join(line + b"\\n" for line in data))
        os.fsync(fd)  # the log first, as the audit writer does
        log.append(leaf_hash(line) for line in data)
        seq += count
        if batch % 5 == 0:
            log.sync()
        print(seq, flush=True)
    """
)


def test_kill_9_in_the_middle_of_a_burst(tmp_path: Path) -> None:
    directory, log_path = tmp_path / "tree", tmp_path / "audit.jsonl"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(log_path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    ) as child:
        assert child.stdout is not None
        try:
            for _ in range(40):  # let it write a few thousand entries, then kill it mid-flight
                assert child.stdout.readline()
        finally:
            child.kill()
            child.wait()
    stored = log_path.read_bytes().split(b"\n")
    if stored[-1]:
        stored.pop()  # a torn last line was never acknowledged
    stored = [line for line in stored if line]
    assert len(stored) > 2000
    reference = MemoryTree(leaf_hash(line) for line in stored)
    again = TileLog.open(directory, len(stored), reader(stored))
    assert again.root() == reference.root()
    view = again.view()
    rnd = random.Random(5)
    for _ in range(50):
        size = rnd.randint(1, len(stored))
        index = rnd.randrange(size)
        assert inclusion_proof(view, index, size) == inclusion_proof(reference, index, size)
