"""The Merkle tree's interior hashes on disk, as C2SP tlog-tiles.

Under the directory the caller names (``<data-dir>/tree/``), ``tile/<L>/<N>`` holds 256
consecutive hashes of tree level ``8 * L`` (8,192 bytes); the ``N`` is written in 3-digit
path elements, all but the last prefixed with ``x`` (``x001/x234/067``). The levels in
between are recomputed from a tile when read, so any node costs one tile read, and a proof
at a million entries reads three tiles. The right edge of each level (a partial tile, fewer
than 256 hashes) lives in memory while the log grows; :meth:`TileLog.sync` writes it as
``tile/<L>/<N>.p/<W>``, so at every synced size the directory is a tlog-tiles tree that a
static file server could publish.

Durability. The tree is derived from the log, which is the source of truth, so the hot
path never waits for the disk: a full tile is written (temporary name, then rename) as
soon as it fills, without fsync, in the same batch that appended its last leaf.
:meth:`TileLog.sync` (meant for each signed checkpoint, off the hot path) fsyncs the tiles
written since the previous sync, writes the partial tiles, and then records the synced
size in ``synced``. :meth:`TileLog.open` trusts only full tiles below that size (and
below the log's own size), throws away everything after them, and re-appends the missing
leaves from the log's stored lines: after a crash at any point, kill -9 or power loss, the
tree and the log agree again, at the cost of re-hashing the lines since the last sync.

Threads. The writer appends in its own worker thread while :meth:`TileLog.sync` runs in
another: sync takes a consistent picture of the tree under the log's lock (the size, the
full tiles written since the last sync, the partial edges) and does its I/O outside it,
so an append waits at most for that picture, never for an fsync. Appends never touch a
partial tile on disk; sync writes them and removes those of tiles that filled since.
An append that fails half-way (a full disk) leaves the log *broken*: it refuses further
appends and syncs, and its owner reopens the tree from the log (:meth:`TileLog.open`).

Readers get a :class:`TreeView`: an immutable snapshot (a size, that size's partial
tiles and its right edge) that answers :class:`~actors.journal.merkle.HashSource` queries
from any thread, through a bounded cache of full tiles shared by all views, and gives the
root of its size without any I/O.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from actors.fsutil import atomic_write, fsync_dir
from actors.journal.merkle import Frontier, NodeId, fold, leaf_hash

HEIGHT = 8
WIDTH = 1 << HEIGHT  # hashes in a full tile
TILE_BYTES = WIDTH * 32
#: full tiles kept decoded in memory by default (at most ~16 KiB each with their levels)
CACHE_TILES = 256
_sha256 = hashlib.sha256


class TileDamaged(LookupError):
    """A tile the tree's size says exists is missing or has the wrong length."""


def tile_path(level: int, index: int, width: int = WIDTH) -> str:
    """The tlog-tiles path of a tile: ``tile/<L>/<N>`` or, when partial, ``.../<N>.p/<W>``."""
    if not 0 <= level <= 63 or index < 0 or not 1 <= width <= WIDTH:
        raise ValueError(f"no tile {level}/{index} of width {width}")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    name = "/".join(reversed(groups))
    suffix = f".p/{width}" if width < WIDTH else ""
    return f"tile/{level}/{name}{suffix}"


#: held while a level inside a tile is computed: views are read from several threads
_LEVELS_LOCK = threading.Lock()


class _TileTree:
    """One tile's hashes and the levels above them inside the tile, computed when asked.

    Shared between threads (cached full tiles, a view's partial tiles): a level is added
    under a lock, and a level once added never changes.
    """

    __slots__ = ("levels",)

    def __init__(self, data: bytes) -> None:
        self.levels = [data]

    def node(self, sublevel: int, index: int) -> bytes:
        levels = self.levels
        if len(levels) <= sublevel:
            with _LEVELS_LOCK:
                while len(levels) <= sublevel:
                    below = levels[-1]
                    levels.append(
                        b"".join(
                            _sha256(b"\x01" + below[at : at + 64]).digest()
                            for at in range(0, len(below) - 63, 64)
                        )
                    )
        return levels[sublevel][index * 32 : index * 32 + 32]


class _TileCache:
    """Decoded full tiles, least recently used first out; shared by every view."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self._tiles: OrderedDict[tuple[int, int], _TileTree] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, level: int, index: int) -> _TileTree:
        key = (level, index)
        with self._lock:
            tree = self._tiles.get(key)
            if tree is not None:
                self._tiles.move_to_end(key)
                return tree
        path = self.directory / tile_path(level, index)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise TileDamaged(f"{path}: {error.strerror}") from None
        if len(data) != TILE_BYTES:
            raise TileDamaged(f"{path} holds {len(data)} bytes, not {TILE_BYTES}")
        tree = _TileTree(data)
        with self._lock:
            self._tiles[key] = tree
            while len(self._tiles) > self.capacity:
                self._tiles.popitem(last=False)
        return tree


class TreeView:
    """The stored tree at one size, read-only: a HashSource for proofs up to that size."""

    __slots__ = ("_cache", "_edge", "_partial_trees", "_partials", "size")

    def __init__(
        self, size: int, partials: Sequence[bytes], cache: _TileCache, edge: Sequence[bytes]
    ) -> None:
        self.size = size
        self._partials = tuple(partials)
        self._cache = cache
        self._edge = tuple(edge)
        #: the partial tiles' inner levels, computed once per view when a proof needs them
        self._partial_trees: dict[int, _TileTree] = {}

    def root(self) -> bytes:
        """The root of the tree at this view's size (from its right edge: no I/O)."""
        return fold(self._edge)

    def hashes(self, nodes: Sequence[NodeId]) -> list[bytes]:
        partial_trees = self._partial_trees
        out: list[bytes] = []
        for level, index in nodes:
            if level < 0 or index < 0 or (index + 1) << level > self.size:
                raise LookupError(f"node {level}/{index} is not in a tree of size {self.size}")
            tile_level, sublevel = divmod(level, HEIGHT)
            first = index << sublevel  # its first hash at the tile level's tree level
            tile, offset = divmod(first, WIDTH)
            if tile < self.size >> (HEIGHT * (tile_level + 1)):
                tree = self._cache.get(tile_level, tile)
            else:
                tree = partial_trees.get(tile_level) or partial_trees.setdefault(
                    tile_level, _TileTree(self._partials[tile_level])
                )
            out.append(tree.node(sublevel, offset >> sublevel))
        return out


class TileLog:
    """The tree's single writer: appends leaves, writes tiles, syncs, hands out views.

    One owner calls :meth:`append` and :meth:`sync`, never both at once; :meth:`view` may
    be called from anywhere and its result used from any thread.
    """

    def __init__(self, directory: Path, cache_tiles: int = CACHE_TILES) -> None:
        self.directory = directory
        self._cache = _TileCache(directory, cache_tiles)
        self._frontier = Frontier()
        self._partials: list[bytearray] = [bytearray()]
        self._unsynced: list[Path] = []
        self._dirs: set[Path] = set()
        self._view = TreeView(0, [b""], self._cache, [])
        #: held while the tree changes and while sync takes its picture of it
        self._lock = threading.Lock()
        self._broken = False

    # --- opening and recovery --------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        log_size: int,
        read_lines: Callable[[int], Iterable[bytes]],
        *,
        cache_tiles: int = CACHE_TILES,
    ) -> TileLog:
        """The tree of a log of ``log_size`` entries, brought in line with the log.

        ``read_lines(i)`` yields the log's stored lines (without their newline) from leaf
        ``i`` (seq ``i + 1``) on; it is asked only for the lines after the last synced
        full tile. Blocking: call it from a worker thread.
        """
        directory.mkdir(parents=True, exist_ok=True)
        log = cls(directory, cache_tiles)
        base = log._trusted_base(min(_read_synced(directory), log_size))
        log._discard_beyond(base)
        log._rebuild_edge(base)
        pending: list[bytes] = []
        count = base
        for line in read_lines(base):
            if count == log_size:
                break
            pending.append(leaf_hash(line))
            count += 1
            if len(pending) == 4096:
                log.append(pending)
                pending = []
        log.append(pending)
        if log.size != log_size:
            raise ValueError(f"the log yielded {log.size} entries, not {log_size}")
        log._discard_partials()
        log.sync()
        return log

    def _trusted_base(self, trusted: int) -> int:
        """The largest size at most ``trusted`` whose full tiles are all on disk, whole.

        Tiles are checked from the top level down: a level's tiles cover the ones below.
        """
        base = trusted - trusted % WIDTH
        level = 0
        while base >> (HEIGHT * (level + 1)):
            level += 1
        for tile_level in range(level, -1, -1):
            span = HEIGHT * (tile_level + 1)
            for index in range(base >> span):
                path = self.directory / tile_path(tile_level, index)
                if not path.is_file() or path.stat().st_size != TILE_BYTES:
                    base = index << span
                    break
        return base

    def _discard_beyond(self, base: int) -> None:
        """Remove every full tile not wholly below ``base`` (partial tiles are left to
        :meth:`_discard_partials`, once the size is known)."""
        root = self.directory / "tile"
        if not root.is_dir():
            return
        for level_dir in root.iterdir():
            if not level_dir.name.isdigit():
                continue
            keep = base >> (HEIGHT * (int(level_dir.name) + 1))
            for dirpath, dirnames, filenames in os.walk(level_dir):
                here = Path(dirpath)
                dirnames[:] = [name for name in dirnames if not name.endswith(".p")]
                for name in filenames:
                    index = _index_of(level_dir, here / name)
                    if index is None or index >= keep:
                        (here / name).unlink()

    def _discard_partials(self) -> None:
        """Remove every partial tile but the ones of the current size (which sync then
        finds in place: a reopened tree that did not change is not rewritten)."""
        root = self.directory / "tile"
        if not root.is_dir():
            return
        size = self.size
        current = {
            self.directory / tile_path(level, size >> (HEIGHT * (level + 1)), len(edge) // 32)
            for level, edge in enumerate(self._partials)
            if edge
        }
        for partial in sorted(root.glob("*/**/*.p")):
            if not partial.is_dir():
                continue
            for width in partial.iterdir():
                if width not in current:
                    if width.is_dir():
                        shutil.rmtree(width)
                    else:
                        width.unlink()
            if not any(partial.iterdir()):
                partial.rmdir()

    def _rebuild_edge(self, base: int) -> None:
        """Partial tiles above level 0 and the frontier at ``base`` (a multiple of 256)."""
        level = 0
        while base >> (HEIGHT * (level + 1)):
            level += 1
            below = level - 1
            first_tile = (base >> (HEIGHT * (level + 1))) << HEIGHT
            last_tile = base >> (HEIGHT * level)
            self._partials.append(
                bytearray(
                    b"".join(
                        self._cache.get(below, tile).node(HEIGHT, 0)
                        for tile in range(first_tile, last_tile)
                    )
                )
            )
        partials = TreeView(base, [bytes(p) for p in self._partials], self._cache, [])
        self._frontier = Frontier.restore(partials, base)
        self._publish(base)

    # --- the writer's side ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._frontier.size

    def root(self) -> bytes:
        """The root of the current tree (O(log n), from the frontier)."""
        return self._frontier.root()

    def view(self) -> TreeView:
        """A read-only snapshot of the tree at its current size."""
        return self._view

    @property
    def broken(self) -> bool:
        """An append failed half-way: reopen the tree from the log."""
        return self._broken

    def append(self, leaves: Iterable[bytes]) -> None:
        """Add leaf hashes in order; full tiles go to disk as they fill (no fsync).

        When it raises (``OSError`` from a full disk), the log is broken from then on.
        """
        batch = list(leaves)
        with self._lock:
            if self._broken:
                raise TileDamaged(f"the tree in {self.directory} must be reopened")
            try:
                first = self.size
                upper = self._frontier.extend(batch, stride=HEIGHT)
                self._add(0, first, b"".join(batch))
                for node in upper:
                    self._add(node.level // HEIGHT, node.index, node.hash)
                self._publish(self.size)
            except BaseException:
                self._broken = True
                raise

    def _add(self, tile_level: int, index: int, data: bytes) -> None:
        """Add hashes starting at ``index`` to a level's edge, writing tiles that fill."""
        partials = self._partials
        if tile_level == len(partials):
            partials.append(bytearray())
        edge = partials[tile_level]
        tile = index >> HEIGHT
        edge += data
        while len(edge) >= TILE_BYTES:
            self._write_full(tile_level, tile, bytes(edge[:TILE_BYTES]))
            del edge[:TILE_BYTES]
            tile += 1

    def _publish(self, size: int) -> None:
        partials = [bytes(p) for p in self._partials]
        self._view = TreeView(size, partials, self._cache, self._frontier.edge())

    def _write_full(self, level: int, index: int, data: bytes) -> None:
        path = self.directory / tile_path(level, index)
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        _write_replace(path, data, sync=False)
        self._unsynced.append(path)

    def sync(self) -> int:
        """Make the tree durable at its current size; returns that size (blocking: call it
        from a thread, also while another thread appends).

        Fsyncs the full tiles written since the last sync, writes this size's partial
        tiles, fsyncs their directories, and only then records the size in ``synced``.
        The partial tiles of tiles that have filled since are removed.
        """
        with self._lock:
            if self._broken:
                raise TileDamaged(f"the tree in {self.directory} must be reopened")
            size = self.size
            unsynced, self._unsynced = self._unsynced, []
            partials = [bytes(edge) for edge in self._partials]
        try:
            self._make_durable(size, unsynced, partials)
        except BaseException:
            with self._lock:
                self._unsynced[:0] = unsynced  # the next sync tries them again
            raise
        return size

    def _make_durable(self, size: int, unsynced: list[Path], partials: list[bytes]) -> None:
        for path in unsynced:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            stale = path.with_name(path.name + ".p")
            if stale.is_dir():
                shutil.rmtree(stale)
        dirs = {path.parent for path in unsynced}
        for level, edge in enumerate(partials):
            if edge:
                path = self.directory / tile_path(
                    level, size >> (HEIGHT * (level + 1)), len(edge) // 32
                )
                if not _holds(path, edge):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_replace(path, edge, sync=True)
                dirs.update((path.parent, path.parent.parent))
        for directory in dirs:
            fsync_dir(directory)
        synced = f"{size}\n".encode()
        if not _holds(self.directory / "synced", synced):
            atomic_write(self.directory / "synced", synced, mode=0o644)


def _write_replace(path: Path, data: bytes, *, sync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data``, durably (fsynced now if so)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != len(data) or os.read(fd, len(data) + 1) != data:
            return False
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read_synced(directory: Path) -> int:
    """The size the last sync recorded; 0 when there is none or it does not parse."""
    try:
        text = (directory / "synced").read_text("ascii")
    except (OSError, UnicodeDecodeError):
        return 0
    value = text.removesuffix("\n")
    return int(value) if value.isdigit() and value.isascii() else 0


def _index_of(level_dir: Path, path: Path) -> int | None:
    """The tile index a full tile's path encodes, or None for anything else."""
    parts = path.relative_to(level_dir).parts
    if not parts:
        return None
    *upper, last = parts
    if not (len(last) == 3 and last.isdigit()):
        return None
    if not all(len(p) == 4 and p[0] == "x" and p[1:].isdigit() for p in upper):
        return None
    index = 0
    for part in [*(p[1:] for p in upper), last]:
        index = index * 1000 + int(part)
    return index
