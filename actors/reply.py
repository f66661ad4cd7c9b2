"""The one-shot answer of an actor call.

A caller creates a :class:`Reply`, puts it in the message it sends, and waits on it; the
actor answers with exactly one :class:`outcome.Outcome` and never waits itself.
"""

from __future__ import annotations

from typing import Any

import outcome
import trio


class Reply:
    """A one-shot answer slot: the first outcome put in wins, later ones are dropped.

    Cheaper than a memory-channel pair per call (no channel state, no close), which
    matters because every request makes at least one call.
    """

    __slots__ = ("_done", "_result")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._result: outcome.Outcome[Any] | None = None

    def send_nowait(self, result: outcome.Outcome[Any]) -> None:
        if self._result is None:
            self._result = result
            self._done.set()

    async def receive(self) -> outcome.Outcome[Any]:
        await self._done.wait()
        assert self._result is not None
        return self._result


def send_reply(reply: Reply | None, result: outcome.Outcome[Any]) -> None:
    """Answer a call without ever blocking; a caller that gave up loses the answer."""
    if reply is not None:
        reply.send_nowait(result)
