"""``vm-tenant`` built without the Merkle tree: the variant ``bench.cpu`` compares against.

``python -m bench.without_tree serve ...`` is ``vm-tenant serve ...`` in which the audit
writer's batches are not appended to the tree (``LogTree.append_lines`` does nothing):
everything else, the leaf hashing and tile writes excepted, runs as in the real build.
Proofs and checkpoints of such a server answer 503 (its tree stays empty); it exists only
so that ``python -m bench.cpu --tree on=. --tree off=no-merkle`` can measure, as a ratio
of server CPU per answer in one run, what the tree costs a spawn.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from actors.journal.tree import LogTree


def _not_appended(self: LogTree, lines: Sequence[bytes], size: int) -> None:
    """The tree is off: the batch is durable, and that is all."""


def main() -> int:
    LogTree.append_lines = _not_appended  # type: ignore[method-assign]
    from server.cli.main import main as vm_tenant

    return vm_tenant()


if __name__ == "__main__":
    sys.exit(main())
