"""The audit writer: the single owner of the hash chain's head and of the segment files.

Callers :meth:`AuditWriter.append` a draft (``actors/journal/entries.py``) without
waiting; it lands in a bounded mailbox and the caller gets an :class:`AuditTicket`. The
writer's loop is a group commit: it takes everything that piled up in the mailbox, gives
each entry its ``seq``, ``prev`` and ``hash``, writes all lines with one ``write`` and
makes them durable with one ``fsync`` (in a worker thread, so the event loop keeps
serving), appends their leaves to the Merkle tree (``actors/journal/tree.py``) in the same
thread, tells its observers, and only then sets every ticket. Under load one fsync
covers many entries; alone, an entry costs exactly one. The tree's view is published
together with the head (:attr:`AuditWriter.tree_view`), so a reader on the event loop
sees ``seq``, ``head`` and a tree of that size at once.

The writer knows one thing about the protocol above it: a VM operation's ``requested``
entry is followed by its outcome entry as soon as the fleet answers. While such an outcome
is due soon (its request became durable less than ``DUE_WINDOW`` ago), the writer lingers,
at most ``linger`` seconds, or until the event loop has nothing else to run, before it
commits, so that outcomes share the fsync instead of each paying for one. With nothing
due, as for a lone caller, it commits at once. (Under steady load with a fleet slower than
the window, requests keep becoming durable, so most batches wait the whole ``linger``:
at most 5 ms added to a write that already waits for the fleet.)

When a write or an fsync fails, the batch is not durable: its *lost* observers hear of
its drafts, its tickets fail with :class:`~actors.errors.AuditUnavailable`, the head
stays at the last durable entry,
and the file is cut back to its last durable size before anything else is appended. The
cut happens through a freshly opened descriptor, and an fsync that failed is never
retried on the same pages and then trusted: the lines are written again in a new batch.

From such a failure until a write succeeds again the writer is *failing* (not
:attr:`~AuditWriter.healthy`, so ``/readyz`` answers 503). Cutting the file back needs no
free space, so it proves nothing about the next write: while failing, the writer probes
on its own every ``REPAIR_INTERVAL`` seconds by writing a page past the durable end of
its segment, making it durable and cutting it off again. The first probe or batch that
succeeds ends the failure, with or without traffic.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from math import inf
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from actors.errors import AuditUnavailable
from actors.journal.chain import GENESIS, seal
from actors.journal.entries import Entry, draft
from actors.journal.segments import segment_name
from actors.journal.tiles import TreeView
from actors.journal.tree import LogTree

if TYPE_CHECKING:
    from actors.metrics import Metrics

#: called with the entries of each batch once they are durable (or with the drafts that
#: were not made durable), before any of their waiters runs
Observer = Callable[[list[Entry]], None]

log = logging.getLogger("vm_tenant.audit")
#: operations whose ``requested`` entry announces an outcome entry to follow
_ANNOUNCING_OPS = frozenset({"vm.spawn", "vm.destroy"})
_OUTCOMES = frozenset({"succeeded", "failed"})
#: how long after its request an outcome is expected "soon" (a fleet's quick answer)
DUE_WINDOW = 0.05
#: how often a failing writer repairs its file and probes the disk on its own (seconds)
REPAIR_INTERVAL = 1.0
#: what a probe writes past the durable end (and cuts off again): a whole page, so that
#: it needs a free block even where the segment's last page still has room
PROBE = b" " * 4096


class AuditTicket:
    """The promise of one submitted entry: :meth:`wait` returns it once it is durable."""

    __slots__ = ("_done", "entry", "error")

    def __init__(self) -> None:
        self._done = trio.Event()
        self.entry: dict[str, Any] | None = None
        self.error: str | None = None

    def _resolve(self, entry: dict[str, Any] | None, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.entry, self.error = entry, error
        self._done.set()

    async def wait(self) -> dict[str, Any]:
        """The stored entry; raises ``AuditUnavailable`` when it could not be made durable.

        The writer always answers, so callers shield this wait when they must apply the
        outcome whatever happens to their own request.
        """
        await self._done.wait()
        if self.entry is None:
            raise AuditUnavailable(self.error or "the audit entry could not be made durable")
        return self.entry


@dataclass(slots=True)
class AuditStats:
    """Counters exported by the writer (cumulative since start)."""

    entries: int = 0
    batches: int = 0
    fsyncs: int = 0
    failures: int = 0
    largest_batch: int = 0
    #: batches that waited for outcomes due soon before their commit
    lingered: int = 0
    #: probes of a failing log that failed in a row (0 once a write succeeds)
    failed_probes: int = 0


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int
    size: int  # bytes known to be durable


@dataclass(slots=True)
class _Pending:
    draft: Entry
    ticket: AuditTicket = field(default_factory=AuditTicket)


class AuditWriter:
    """Appends entries to ``<data-dir>/audit/`` with group commit; exactly one per data dir.

    ``head_seq``/``head_hash`` are the last durable entry found at start (0 and 64 zeros
    for an empty log). ``fsync`` is the function used to make a file durable; tests pass
    one that counts calls or raises a real ``OSError``. ``inline_io`` does the file work
    on the event loop's thread instead of a worker thread: only for tests under Trio's
    virtual clock, which would otherwise jump ahead while a thread fsyncs. ``metrics``,
    when given, receives batch sizes, fsync durations and I/O failures. ``tree``, when
    given, is the log's Merkle tree, already open at ``head_seq`` entries: each durable
    batch is appended to it before the batch is acknowledged.
    """

    def __init__(
        self,
        audit_dir: Path,
        head_seq: int = 0,
        head_hash: str = GENESIS,
        *,
        fsync: Callable[[int], None] = os.fsync,
        max_queue: int = 65536,
        max_batch: int = 4096,
        segment_bytes: int = 16 * 1024 * 1024,
        inline_io: bool = False,
        metrics: Metrics | None = None,
        linger: float = 0.005,
        tree: LogTree | None = None,
    ) -> None:
        self.audit_dir = audit_dir
        self.seq = head_seq
        self.head = head_hash
        self._tree = tree
        #: the tree as of ``seq`` (smaller only while the tree is behind the log)
        self.tree_view: TreeView | None = tree.view() if tree is not None else None
        self.stats = AuditStats()
        self._fsync = fsync
        self._inline_io = inline_io
        self._max_batch = max_batch
        self._linger = linger
        #: VM id -> when its ``requested`` entry became durable, until its outcome is
        #: submitted; in insertion order, so the last one is the most recent
        self._outcomes_due: dict[str, float] = {}
        self._segment_bytes = segment_bytes
        self._segment: _Segment | None = None
        self._needs_repair = False
        #: the last attempt to write (a batch or a probe) failed and none succeeded since
        self._failing = False
        self._damaged: str | None = None
        self._send, self._receive = trio.open_memory_channel[_Pending](max_queue)
        self._durable = trio.Condition()
        self._metrics = metrics
        self._durable_observers: list[Observer] = []
        self._lost_observers: list[Observer] = []

    # -- the caller's side ---------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False from a failed write until a write or a probe succeeds, and when damaged."""
        return not self._failing and self._damaged is None

    def mark_damaged(self, reason: str) -> None:
        """Refuse every further entry: the journal is damaged and must not grow."""
        self._damaged = reason
        log.error("audit log damaged, refusing writes: %s", reason)

    def append(self, entry: Entry) -> AuditTicket:
        """Queue one draft (``actors/journal/entries.py``) and return its ticket at once.

        Raises ``AuditUnavailable`` at once when the journal is damaged, the writer has
        stopped, or its mailbox is full (the caller answers 503 rather than queue forever).
        """
        if self._damaged is not None:
            raise AuditUnavailable("the audit log is damaged; writes are refused")
        vm = entry["vm"]
        if entry["outcome"] in _OUTCOMES and entry["op"] in _ANNOUNCING_OPS and vm is not None:
            self._outcomes_due.pop(vm, None)
        pending = _Pending(entry)
        try:
            self._send.send_nowait(pending)
        except trio.WouldBlock:
            raise AuditUnavailable("the audit writer is overloaded") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise AuditUnavailable("the audit writer has stopped") from None
        return pending.ticket

    def submit(
        self,
        *,
        op: str,
        outcome: str,
        tenant: str | None,
        vm: str | None,
        source: dict[str, Any],
        request_id: str | None,
        detail: dict[str, Any],
    ) -> AuditTicket:
        """:meth:`append` a draft made of these fields, stamped now."""
        return self.append(draft(op, outcome, tenant, vm, source, request_id, detail))

    async def wait_durable(self, seq: int) -> None:
        """Return once every entry up to ``seq`` is durable."""
        async with self._durable:
            while self.seq < seq:
                await self._durable.wait()

    @property
    def queue_depth(self) -> int:
        """Entries submitted and not yet taken into a batch."""
        return self._send.statistics().current_buffer_used

    def observe_durable(self, observer: Observer) -> None:
        """Call ``observer`` with every batch of entries once it is durable, in chain order.

        It runs on the writer's task before the batch's waiters wake up, so it must be
        quick and must not raise.
        """
        self._durable_observers.append(observer)

    def observe_lost(self, observer: Observer) -> None:
        """Call ``observer`` with the drafts of every batch that was not made durable.

        Like :meth:`observe_durable`: on the writer's task, before the waiters wake up.
        """
        self._lost_observers.append(observer)

    def _notify(self, observers: list[Observer], entries: list[Entry]) -> None:
        for observer in observers:
            try:
                observer(entries)
            except Exception:
                # The batch's fate is decided: an observer's bug must not change it.
                log.exception("an audit observer failed")

    def _fail(self, batch: list[_Pending], error: str) -> None:
        """Tell the lost observers, then every waiter of ``batch``: nothing is durable."""
        self._notify(self._lost_observers, [pending.draft for pending in batch])
        for pending in batch:
            pending.ticket._resolve(None, error)

    def close(self) -> None:
        """Stop taking entries; :meth:`run` writes what is queued and then returns."""
        self._send.close()

    # -- the writer's loop ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor: group-commit batches until the mailbox is closed and drained."""
        task_status.started()
        try:
            with self._receive:
                while True:
                    # While failing, do not wait for a write to find out whether the
                    # disk is back: /readyz must recover without traffic.
                    first = None
                    with trio.move_on_after(REPAIR_INTERVAL if self._failing else inf):
                        try:
                            first = await self._receive.receive()
                        except trio.EndOfChannel:
                            break
                    if first is None:
                        await self._try_recover()
                        continue
                    batch = await self._gather(first)
                    try:
                        await self._commit(batch)
                    except Exception:
                        # A bug here must not take the whole service down: fail the
                        # batch's waiters (nothing of theirs was acknowledged) and go on.
                        log.exception("audit writer failed on a batch")
                        self._fail(batch, "internal error in the audit writer")
        finally:
            if self._segment is not None and self._segment.fd >= 0:
                os.close(self._segment.fd)
            self._segment = None

    async def _gather(self, first: _Pending) -> list[_Pending]:
        """The next batch: ``first``, what is queued, and the outcomes due soon."""
        # One scheduling round before draining: tasks that are already runnable (other
        # requests about to submit) join this batch instead of waiting for the next one.
        await trio.lowlevel.checkpoint()
        if self._outcome_due_soon():
            # Those outcomes come from tasks that are runnable now or soon: wait until the
            # event loop has nothing else to run, or the linger ends. What still has not
            # arrived then waits on the outside world (a slow fleet), and goes in a later
            # batch. (trio.testing's helper is the scheduler's own idle signal.)
            self.stats.lingered += 1
            with trio.move_on_after(self._linger):
                await trio.testing.wait_all_tasks_blocked()
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    def _outcome_due_soon(self) -> bool:
        if not self._outcomes_due:
            return False
        latest = next(reversed(self._outcomes_due.values()))
        return trio.current_time() - latest < DUE_WINDOW

    async def _try_recover(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self._offload(self._probe)
        except OSError as error:
            self.stats.failed_probes += 1
            # the first failed probe is worth a warning; then one a minute
            level = logging.WARNING if self.stats.failed_probes % 60 == 1 else logging.DEBUG
            log.log(level, "audit log still not writable: %s", error)
            return
        self._writable_again()

    def _writable_again(self) -> None:
        if self._failing:
            self._failing = False
            self.stats.failed_probes = 0
            log.warning("audit log writable again; accepting writes")

    async def _offload(self, fn: Callable[..., None], *args: Any) -> None:
        if self._inline_io:
            fn(*args)
        else:
            await trio.to_thread.run_sync(fn, *args)

    async def _commit(self, batch: list[_Pending]) -> None:
        if self._damaged is not None:
            self._fail(batch, "the audit log is damaged; writes are refused")
            return
        seq, head = self.seq, self.head
        lines: list[bytes] = []
        entries: list[Entry] = []
        sealed: list[_Pending] = []
        for pending in batch:
            entry = {"seq": seq + 1, **pending.draft, "prev": head}
            try:
                line = seal(entry)
            except (TypeError, ValueError, UnicodeError) as error:
                # An entry that cannot be encoded fails alone; the chain skips it.
                log.error("audit entry %s refused: %s", pending.draft.get("op"), error)
                self._fail([pending], "the audit entry could not be encoded")
                continue
            seq += 1
            lines.append(line)
            head = entry["hash"]
            entries.append(entry)
            sealed.append(pending)
        if not sealed:
            return
        batch = sealed
        first_seq = self.seq + 1
        try:
            # Shielded: a batch that reached the disk must be acknowledged or cut back,
            # never abandoned half-way by a cancellation.
            with trio.CancelScope(shield=True):
                await self._offload(self._write_batch, first_seq, lines)
        except OSError as error:
            self.stats.failures += 1
            self._failing = True
            log.error("audit batch of %d entries not durable: %s", len(batch), error)
            self._fail(batch, f"the audit entry could not be made durable: {error}")
            return
        self._writable_again()
        self.seq, self.head = seq, head
        if self._tree is not None:
            self.tree_view = self._tree.view()
        now = trio.current_time()
        for entry in entries:
            if entry["outcome"] == "requested" and entry["op"] in _ANNOUNCING_OPS:
                self._outcomes_due.pop(entry["vm"], None)  # re-inserted as the latest
                self._outcomes_due[entry["vm"]] = now
        self.stats.entries += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        if self._metrics is not None:
            self._metrics.audit_batch_size.observe(len(batch))
        self._notify(self._durable_observers, entries)
        for pending, entry in zip(batch, entries, strict=True):
            pending.ticket._resolve(entry)
        async with self._durable:
            self._durable.notify_all()

    # -- file work, in a worker thread -----------------------------------------------------

    def _write_batch(self, first_seq: int, lines: list[bytes]) -> None:
        if self._needs_repair:
            self._repair()
        data = b"".join(lines)
        segment = self._segment_for(first_seq)
        fsyncing = False
        try:
            written = 0
            while written < len(data):
                written += os.write(segment.fd, data[written:])
            fsyncing = True
            started = time.perf_counter()
            self._fsync(segment.fd)
            if self._metrics is not None:
                self._metrics.audit_fsync.observe(time.perf_counter() - started)
            fsyncing = False
            self.stats.fsyncs += 1
            if os.fstat(segment.fd).st_nlink == 0:
                # Lines written to an unlinked file are lost with it: the journal has a
                # hole now, and a damaged journal is never appended to.
                self.mark_damaged(f"the audit segment {segment.path.name} was removed")
                raise OSError(errno.ENOENT, "the audit segment was removed")
        except OSError:
            if self._metrics is not None:
                metrics = self._metrics
                (metrics.audit_fsync_failed if fsyncing else metrics.audit_write_failed).inc()
            self._needs_repair = True
            # Cut our lines off at once (a reader must never see them); if the disk
            # refuses even that, the writer retries until it succeeds.
            with contextlib.suppress(OSError):
                self._repair()
            raise
        segment.size += len(data)
        if self._tree is not None:
            # Durable now: the tree may cover these lines (it never raises).
            self._tree.append_lines(lines, first_seq + len(lines) - 1)

    def _repair(self) -> None:
        """Cut the current segment back to its durable size through a fresh descriptor.

        The segment record (path and durable size) is kept when this fails, so a later
        attempt still knows where to cut.
        """
        segment = self._segment
        if segment is not None:
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
            fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.ftruncate(fd, segment.size)
                self._fsync(fd)
            except OSError:
                os.close(fd)
                raise
            segment.fd = fd
        self._needs_repair = False

    def _probe(self) -> None:
        """Check that the disk takes a write now, leaving the log as it was.

        Repairs the segment first if it needs it, writes :data:`PROBE` past its durable
        end, makes that durable, and cuts it off again. A crash in between leaves an
        incomplete last line, which the next start cuts off like any torn write.
        """
        if self._needs_repair:
            self._repair()
        segment = self._segment_for(self.seq + 1)
        self._needs_repair = True  # until the probe's bytes are cut off again
        written = 0
        while written < len(PROBE):
            written += os.write(segment.fd, PROBE[written:])
        self._fsync(segment.fd)
        self._repair()

    def _segment_for(self, first_seq: int) -> _Segment:
        segment = self._segment
        if segment is None:
            segment = self._open_last_segment(first_seq)
        if segment.size >= self._segment_bytes:
            os.close(segment.fd)
            self._segment = None
            segment = self._create_segment(first_seq)
        self._segment = segment
        return segment

    def _open_last_segment(self, first_seq: int) -> _Segment:
        existing = sorted(self.audit_dir.glob("*.jsonl"))
        if not existing:
            return self._create_segment(first_seq)
        path = existing[-1]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        return _Segment(path, fd, os.fstat(fd).st_size)

    def _create_segment(self, first_seq: int) -> _Segment:
        path = self.audit_dir / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # The new name must survive a crash as well as the lines written into it.
            dir_fd = os.open(self.audit_dir, os.O_RDONLY)
            try:
                self._fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return _Segment(path, fd, 0)
