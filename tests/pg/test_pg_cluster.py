"""The test suite's own PostgreSQL: a real server from the wheel, gone when its owner is."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pgcluster import PgCluster, PgDatabase, server_account


def test_shared_cluster_serves_a_fresh_database(pg_db: PgDatabase) -> None:
    assert pg_db.cluster.psql("SELECT current_database()", pg_db.name).strip() == pg_db.name
    assert (
        pg_db.cluster.psql(
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' "
            "AND relnamespace = 'public'::regnamespace",
            pg_db.name,
        ).strip()
        == "0"
    )


def test_server_runs_unprivileged(pg_cluster: PgCluster) -> None:
    uid, _ = server_account()
    assert os.stat(f"/proc/{pg_cluster.pid}").st_uid == uid
    if os.geteuid() == 0:
        assert uid != 0
    assert (pg_cluster.data / "PG_VERSION").stat().st_uid == uid


def test_stop_and_start_keep_the_data(pg_own: PgDatabase) -> None:
    cluster = pg_own.cluster
    cluster.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)", pg_own.name)
    cluster.stop()
    assert not cluster.running
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)",
            str(cluster.port),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0, "the port still accepts connections after stop"
    cluster.start()
    assert cluster.psql("SELECT x FROM t", pg_own.name).strip() == "7"
    cluster.kill()
    assert not cluster.running
    cluster.start()
    assert cluster.psql("SELECT x FROM t", pg_own.name).strip() == "7"


OWNER = """
import sys
sys.path.insert(0, sys.argv[1])
from pgcluster import start_cluster
cluster = start_cluster()
print(cluster.root, cluster.pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_owner_leaves_no_server_behind() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(Path(__file__).parents[1])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    root, pid = owner.stdout.readline().split()
    assert Path(root).is_dir()
    os.kill(int(pid), 0)  # the server runs
    owner.kill()
    owner.wait(30)
    owner.stdout.close()
    assert owner.stdin is not None
    owner.stdin.close()
    deadline = time.monotonic() + 60
    while Path(root).exists() or _alive(int(pid)):
        assert time.monotonic() < deadline, "the guard did not stop the server and remove its dir"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
