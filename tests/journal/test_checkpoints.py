"""Signed checkpoints of the chain's head, as the service writes and reopens them."""

from __future__ import annotations

from pathlib import Path

from actors.journal.checkpoint import CheckpointSigner, checkpoints_path, read_checkpoints
from actors.journal.verify import verify_data_dir
from actors.service import open_service
from actors.state import Quota
from actors.tenants.protocol import Source
from conftest import service_config

ADMIN = Source("127.0.0.1", "admin")


async def test_torn_checkpoint_line_is_cut_on_open(data_dir: Path) -> None:
    async with open_service(service_config(data_dir)) as service:
        await service.registry.create_tenant("acme", Quota(4, 4096, 4), ADMIN, "r")
    path = checkpoints_path(data_dir)
    with path.open("ab") as f:
        f.write(b'{"seq": 1, "hash": "ab')  # an append cut short by a crash
    async with open_service(service_config(data_dir)) as service:
        await service.registry.issue_token("acme", ADMIN, "r")
    assert all(c is not None for c in read_checkpoints(data_dir))
    assert verify_data_dir(data_dir).verdict == "ok"
    assert CheckpointSigner(data_dir).latest is not None
