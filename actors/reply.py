"""The one-shot answer of an actor call.

A caller creates a :class:`Reply`, puts it in the message it sends, and waits on it; the
actor answers with exactly one :class:`outcome.Outcome` and never waits itself.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer slot for a value of type ``T`` (or an error).

    Cheaper than a memory-channel pair per call (no channel state, no close), which
    matters because every request makes at least one call. A second answer is a bug
    (two parts of an actor think they own the call) and raises.
    """

    __slots__ = ("_done", "_result")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._result: outcome.Outcome[T] | None = None

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
