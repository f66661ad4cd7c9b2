"""A sequencer alone in a process of its own, for the tests that kill it with SIGKILL.

``python tests/pg/pg_sequencer_proc.py DSN BATCH`` prints ``leading`` once it holds the
sequencer lock, then sequences until it is killed.
"""

from __future__ import annotations

import sys

import trio

from actors.store.postgres.bridge import DatabaseSettings, open_database
from actors.store.postgres.sequencer import Sequencer


async def main(dsn: str, batch: int) -> None:
    async with open_database(DatabaseSettings(dsn)) as db, trio.open_nursery() as nursery:
        sequencer = Sequencer(db, batch=batch, standby_poll=0.1)
        nursery.start_soon(sequencer.run)
        while not sequencer.leading:
            await trio.sleep(0.01)
        print("leading", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
