"""The audit log's Merkle tree as the audit writer keeps it: in step with the log.

:class:`LogTree` owns the tiles under ``<data-dir>/tree/`` (``actors/journal/tiles.py``)
for the audit writer. The writer hands it every batch right after the batch's fsync, in
the same worker thread (:meth:`LogTree.append_lines`), so the tree's size is the durable
log's size before any ticket of the batch resolves: whatever a reader is told is
acknowledged is in the tree.

The tree is derived from the log, so it never fails a write. An append that fails (a
full disk while a tile is written) leaves the tree *behind*: :meth:`LogTree.view` keeps
answering with the last good view (smaller than the log), proofs and checkpoints that
need the current size answer 503, and the next batch reopens the tree from the log
(:meth:`~actors.journal.tiles.TileLog.open`: the synced tiles plus the lines since).
:meth:`LogTree.sync`, run before each stored checkpoint, does the same when no batch came.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from actors.journal.merkle import leaf_hash
from actors.journal.segments import lines_from
from actors.journal.tiles import TileDamaged, TileLog, TreeView

log = logging.getLogger("vm_tenant.audit")


class LogTree:
    """The tiles of one audit log, appended by its writer and synced by its upkeep.

    Blocking methods; :meth:`append_lines` and :meth:`sync` may run at the same time in
    two threads (the writer's and the upkeep's), :meth:`view` from anywhere.
    """

    def __init__(self, directory: Path, audit_dir: Path) -> None:
        self.directory = directory
        self.audit_dir = audit_dir
        self._tiles: TileLog | None = None
        self._view: TreeView | None = None
        #: the log's size as the writer last reported it
        self._log_size = 0
        #: held while the tiles are appended to or replaced
        self._lock = threading.Lock()

    def _read_lines(self, first_leaf: int) -> Iterator[bytes]:
        return lines_from(self.audit_dir, first_leaf + 1)

    def open(self, size: int) -> None:
        """Recover the tree for a log of ``size`` entries (at start, before any batch).

        Raises ``OSError`` (or ``ValueError``: the log is shorter than ``size``).
        """
        with self._lock:
            self._log_size = size
            self._tiles = TileLog.open(self.directory, size, self._read_lines)
            self._view = self._tiles.view()

    def _reopen(self) -> None:
        """Rebuild the tiles up to the log's size from the log; on failure stay behind."""
        self._tiles = None
        try:
            tiles = TileLog.open(self.directory, self._log_size, self._read_lines)
        except (OSError, ValueError) as error:
            log.error("the Merkle tree stays behind the log at %d: %s", self.size, error)
            return
        self._tiles = tiles
        self._view = tiles.view()
        log.warning("the Merkle tree is in step with the log again at %d entries", tiles.size)

    @property
    def size(self) -> int:
        """The size of the last good view (the log's size unless behind)."""
        return self._view.size if self._view is not None else 0

    def view(self) -> TreeView | None:
        """The last good view: at the log's size unless the tree is behind."""
        return self._view

    def append_lines(self, lines: Sequence[bytes], size: int) -> None:
        """Add the batch ``lines`` (each ending in a newline), whose last entry is seq
        ``size``, once they are durable. Never raises."""
        with self._lock:
            self._log_size = size
            tiles = self._tiles
            if tiles is None or tiles.size != size - len(lines):
                self._reopen()
                return
            try:
                tiles.append(leaf_hash(line[:-1]) for line in lines)
            except (OSError, TileDamaged) as error:
                log.error("the Merkle tree could not grow at seq %d: %s", size, error)
                self._tiles = None
                return
            self._view = tiles.view()

    def sync(self) -> int:
        """Make the tree durable at its current size (see ``TileLog.sync``); returns that
        size. A tree left behind is reopened from the log first."""
        with self._lock:
            if self._tiles is None:
                self._reopen()
            tiles = self._tiles
        if tiles is None:
            raise OSError(f"the Merkle tree in {self.directory} is behind the log")
        return tiles.sync()
