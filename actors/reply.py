"""The one-shot answer of an actor call, and the receipt of what the call wrote.

A caller creates a :class:`Reply`, puts it in the message it sends, and waits on it; the
actor answers with exactly one :class:`outcome.Outcome` and never waits itself. A reply
may carry a :class:`Receipt`: the seqs of the audit entries written on behalf of the
call, noted before the answer, so the edge can name them (``Audit-Seq``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


class Receipt:
    """The seqs of the audit entries written on behalf of one request, in chain order.

    The edge makes one per request and hands it along with the request's command; whoever
    waits for an entry of that command (a tenant actor's job, the registry) notes the
    stored entry here before answering. Exact, unlike matching entries by request id,
    which callers choose and may repeat.
    """

    __slots__ = ("seqs",)

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def note(self, entry: Mapping[str, Any]) -> None:
        """An entry of this request is in the chain."""
        self.seqs.append(entry["seq"])


class Reply(Generic[T]):
    """A one-shot answer slot for a value of type ``T`` (or an error).

    Cheaper than a memory-channel pair per call (no channel state, no close), which
    matters because every request makes at least one call. A second answer is a bug
    (two parts of an actor think they own the call) and raises.
    """

    __slots__ = ("_done", "_result", "receipt")

    def __init__(self, receipt: Receipt | None = None) -> None:
        self._done = trio.Event()
        self._result: outcome.Outcome[T] | None = None
        self.receipt = receipt

    def audited(self, entry: Mapping[str, Any]) -> None:
        """Note an entry written for this call on its receipt (if it has one)."""
        if self.receipt is not None:
            self.receipt.note(entry)

    @property
    def answered(self) -> bool:
        return self._result is not None

    def send_nowait(self, result: outcome.Outcome[T]) -> None:
        """Answer; never blocks (a caller that gave up simply never reads it)."""
        if self._result is not None:
            raise RuntimeError("this call was answered already")
        self._result = result
        self._done.set()

    async def receive(self) -> outcome.Outcome[T]:
        await self._done.wait()
        assert self._result is not None
        return self._result


def send_reply(reply: Reply[T] | None, result: outcome.Outcome[T]) -> None:
    """Answer a call, if it has a reply slot (a cast has none)."""
    if reply is not None:
        reply.send_nowait(result)
