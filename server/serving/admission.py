"""Who may hold a connection: the ceilings, in all and per peer address, and who yields.

A connection counts against both ceilings from its accept to its close. When the total
ceiling is reached, a newcomer is not turned away if some connection is keeping the
server waiting for its peer (idle, a head or a body still on its way): the one that has
waited longest is shed to make room, since ending it loses no work. Never shed: a
connection whose request the server is working on; one with bytes the server has not
read yet (then the server keeps it waiting, not the reverse: in a burst, a request can
sit unread for a while); one that has waited less than ``SHED_GRACE`` (its request may
be on its way). A shed connection that has not ended after ``SHED_WAIT`` (a loaded
machine) is joined by the next candidate. Only when none of the ``SHED_CANDIDATES``
longest-waiting can yield is the newcomer refused (see :func:`refuse`). A peer address
over its own ceiling is refused outright: sharing fairly is the point of that ceiling.

One owner: the server's accept loops and its connections' phase changes, all on the
event loop's thread.
"""

from __future__ import annotations

import secrets
import socket
from itertools import islice
from typing import Protocol

import msgspec
import trio

from server.problems import RETRY_AFTER_503, problem_body

#: how long a newcomer waits for a shed connection to let go of its descriptor before
#: another one is shed too
SHED_WAIT = 0.5
#: a connection must have kept the server waiting this long before it can be shed
SHED_GRACE = 0.1
#: how many of the longest-waiting connections are looked at for one newcomer
SHED_CANDIDATES = 16


class Sheddable(Protocol):
    """A connection that can be told to end now (it leaves the admission when it has)."""

    waiting_since: float

    def shed(self) -> None: ...

    def has_unread(self) -> bool: ...


class Admission:
    """The live connection count, per peer too, and the ones that may yield."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self.active = 0
        self._peers: dict[str, int] = {}
        # Insertion-ordered: the first one has been waiting on its peer the longest.
        self._waiting: dict[Sheddable, None] = {}
        #: set (and replaced) whenever a connection leaves: a place may be free
        self._left = trio.Event()

    def peer_full(self, peer: str) -> bool:
        return self._peers.get(peer, 0) >= self.per_peer

    async def make_room(self) -> bool:
        """Whether a newcomer fits, shedding the longest-waiting connection if need be.

        A shed connection ends on its own close path, which takes a few turns of the
        event loop: on a loaded machine that can be longer than ``SHED_WAIT``. Then the
        next candidate is shed as well (a place is being made; the newcomer must not be
        refused for the machine's slowness), and the newcomer is admitted as soon as any
        of them has ended. It is refused only when no candidate can yield.
        """
        if self.active < self.total:
            return True
        for victim in list(islice(self._waiting, SHED_CANDIDATES)):
            if trio.current_time() - victim.waiting_since < SHED_GRACE:
                break  # the ones after it have waited even less
            if victim.has_unread():
                continue
            victim.shed()
            with trio.move_on_after(SHED_WAIT):
                while self.active >= self.total:  # any connection leaving will do
                    await self._left.wait()
            if self.active < self.total:
                return True
        return self.active < self.total

    def enter(self, peer: str) -> None:
        self.active += 1
        self._peers[peer] = self._peers.get(peer, 0) + 1

    def leave(self, peer: str, connection: Sheddable) -> None:
        self.active -= 1
        self._waiting.pop(connection, None)
        self._left.set()
        self._left = trio.Event()
        left = self._peers[peer] - 1
        if left:
            self._peers[peer] = left
        else:
            del self._peers[peer]

    def waiting(self, connection: Sheddable) -> None:
        """``connection`` now waits on its peer (and may yield its place)."""
        self._waiting[connection] = None

    def working(self, connection: Sheddable) -> None:
        """The server is working on a request of ``connection``: it keeps its place."""
        self._waiting.pop(connection, None)

    def statistics(self) -> dict[str, int]:
        return {"active": self.active, "waiting": len(self._waiting), "peers": len(self._peers)}


def refusal(detail: str) -> bytes:
    """A complete minimal HTTP/1.1 503 problem response that closes its connection."""
    payload = msgspec.json.encode(problem_body("overloaded", detail))
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(payload)}\r\n"
        f"retry-after: {RETRY_AFTER_503['overloaded']}\r\n"
        f"x-request-id: {secrets.token_hex(16)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


def refuse(sock: trio.socket.SocketType, detail: str) -> None:
    """Answer a just-accepted connection with a 503 and close it, without waiting.

    The answer is written at once, before the request is read (it fits in the empty
    send buffer of a new socket; if it does not, the peer gets the close alone). Any
    request bytes already received are read and dropped first, so that the close is
    a plain end of file rather than a reset that could destroy the answer in transit.
    """
    raw = socket.socket(fileno=sock.detach())
    try:
        raw.setblocking(False)
        try:
            raw.send(refusal(detail))
            raw.shutdown(socket.SHUT_WR)
            raw.recv(65536)
        except OSError:
            pass
    finally:
        raw.close()
