"""Who yields a place to a newcomer (``server/serving/admission.py``), on the virtual clock.

The connections here only wait, and once shed take ``teardown`` seconds to let go of
their place: on a loaded machine a real connection's close path takes several turns of
the event loop, which is what these stand for (the floods against a real server in
``test_serving_floods.py`` run the same policy with real connections).
"""

from __future__ import annotations

import trio
import trio.testing

from server.serving.admission import SHED_GRACE, SHED_WAIT, Admission


class Waiting:
    """A connection waiting on its peer, slow to close once shed."""

    def __init__(
        self, admission: Admission, nursery: trio.Nursery, teardown: float, unread: bool = False
    ) -> None:
        self.admission = admission
        self.nursery = nursery
        self.teardown = teardown
        self.unread = unread
        self.shed_at: float | None = None
        self.ended = trio.Event()
        self.waiting_since = trio.current_time()
        admission.enter("192.0.2.1")
        admission.waiting(self)

    def shed(self) -> None:
        if self.shed_at is None:
            self.shed_at = trio.current_time()
            self.nursery.start_soon(self._close)

    async def _close(self) -> None:
        await trio.sleep(self.teardown)
        self.admission.leave("192.0.2.1", self)
        self.ended.set()

    def has_unread(self) -> bool:
        return self.unread


async def test_a_slow_close_makes_room_for_the_newcomer_instead_of_refusing_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(total=3, per_peer=10)
    async with trio.open_nursery() as nursery:
        held = [Waiting(admission, nursery, teardown=SHED_WAIT * 1.6) for _ in range(3)]
        await trio.sleep(1)  # every one has waited past the grace
        assert await admission.make_room(), "refused while a place was being freed"
        # the first was still closing after SHED_WAIT, so the second was shed too
        assert [c.shed_at is not None for c in held] == [True, True, False]
        admission.enter("198.51.100.7")
    assert admission.active == 2  # both shed ones left; the newcomer holds a place


async def test_a_quick_close_sheds_one(autojump_clock: trio.testing.MockClock) -> None:
    admission = Admission(total=2, per_peer=10)
    async with trio.open_nursery() as nursery:
        held = [Waiting(admission, nursery, teardown=SHED_WAIT / 10) for _ in range(2)]
        await trio.sleep(1)
        assert await admission.make_room()
        assert [c.shed_at is not None for c in held] == [True, False]


async def test_nobody_yields_who_has_unread_bytes_or_just_arrived(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(total=2, per_peer=10)
    async with trio.open_nursery() as nursery:
        busy = Waiting(admission, nursery, teardown=0.0, unread=True)
        await trio.sleep(1)
        fresh = Waiting(admission, nursery, teardown=0.0)
        await trio.sleep(SHED_GRACE / 2)
        assert not await admission.make_room()
        assert busy.shed_at is None and fresh.shed_at is None
