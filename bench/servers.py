"""The two servers under test, each a pinned subprocess on 127.0.0.1.

* the floor: ``hypercorn --worker-class trio --workers 0 bench.floor_app:app`` (Hypercorn's
  Trio worker in the process itself, as ``vm-tenant serve`` runs it);
* the proxy: ``vm-tenant serve --data-dir <fresh temp dir> --fleet embedded`` with the
  per-tenant limits off (``--rate-limit 0 --max-inflight-spawns 0``) and its Prometheus
  listener on a free port (``--metrics-bind 127.0.0.1:PORT``; ``Server.metrics_url``),
  which the driver scrapes around each run (``bench/metrics.py``).

Pinning (:func:`detect_pinning`): with ``taskset`` and at least two usable cores, both
servers run on the first core and wrk on the second, so the load generator never takes
CPU from the server it measures; the two servers share a core but only one of them is
under load at a time.

With ``trace=True`` (the fsync probe, ``bench/drive.py``) the server runs under
``strace -f --seccomp-bpf -e trace=fsync,fdatasync,syncfs,sync -ttt -T -o <file>``: the
seccomp filter stops the process only at those calls, so every other system call runs
at full speed, and the timestamped lines let ``bench/fsyncs.py`` count the syncs inside
each measured window. strace itself runs on the load generator's core.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TRACED_CALLS = "fsync,fdatasync,syncfs,sync"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STRACE_HINT = "strace is not on PATH (apt-get install -y strace): fsyncs are not counted"


@dataclass(frozen=True, slots=True)
class Pinning:
    """Command prefixes that pin the servers and the load generator to their cores."""

    server: list[str]
    load: list[str]
    description: str


def detect_pinning() -> Pinning:
    taskset = shutil.which("taskset")
    cores = sorted(os.sched_getaffinity(0))
    if taskset is None or len(cores) < 2:
        why = "taskset missing" if taskset is None else f"only {len(cores)} usable core(s)"
        return Pinning([], [], f"not pinned ({why})")
    server, load = cores[0], cores[1]
    return Pinning(
        [taskset, "-c", str(server)],
        [taskset, "-c", str(load)],
        f"servers on core {server} (taskset -c {server}), wrk and strace on core {load} "
        f"(taskset -c {load})",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class Server:
    """A running server: ``pid`` is the server process itself (not strace's)."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    pid: int
    log_path: Path
    trace_path: Path | None
    #: ``http://127.0.0.1:PORT/metrics`` for the proxy; None for the floor
    metrics_url: str | None = None

    def rss_kib(self) -> int | None:
        """Resident set size now (``VmRSS`` from ``/proc/PID/status``)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time of the whole process so far (all its threads)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return 0.0, 0.0
        fields = stat.rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 40.0) -> int | None:
        """SIGTERM the server, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                return self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def _child_of(parent: int, deadline: float) -> int:
    """The pid of ``parent``'s (strace's) child, the traced server."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry.name)
        time.sleep(0.05)
    raise RuntimeError(f"the traced child of pid {parent} did not appear")


def start_server(
    name: str,
    argv: list[str],
    port: int,
    ready_path: str,
    workdir: Path,
    pinning: Pinning,
    *,
    trace: bool,
    timeout: float = 60.0,
    cwd: Path = ROOT,
) -> Server:
    """Start ``argv`` pinned (and traced) in ``cwd``, and wait until ``ready_path`` answers 200."""
    log_path = workdir / f"{name}.log"
    trace_path = workdir / f"{name}.strace" if trace else None
    command = [*pinning.server, *argv]
    if trace_path is not None:
        strace = ["strace", "-f", "--seccomp-bpf", "-qq", "-ttt", "-T"]
        strace += ["-e", f"trace={TRACED_CALLS}", "-o", str(trace_path)]
        command = [*pinning.load, *strace, *command]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    pid = _child_of(process.pid, deadline) if trace_path is not None else process.pid
    server = Server(name, f"http://127.0.0.1:{port}", process, pid, log_path, trace_path)
    try:
        _wait_ready(server, ready_path, deadline)
    except BaseException:
        server.stop(grace=10)
        raise
    return server


def _wait_ready(server: Server, path: str, deadline: float) -> None:
    with httpx.Client(base_url=server.url, timeout=2.0) as client:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited at start:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(path).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} not ready in time:\n{server.log_tail()}")
            time.sleep(0.1)


def start_floor(workdir: Path, pinning: Pinning, *, trace: bool) -> Server:
    port = free_port()
    argv = [str(VENV_BIN / "hypercorn"), "--worker-class", "trio", "--workers", "0"]
    argv += ["--bind", f"127.0.0.1:{port}", "bench.floor_app:app"]
    return start_server("floor", argv, port, "/v1/vms/probe", workdir, pinning, trace=trace)


def start_proxy(workdir: Path, pinning: Pinning, *, trace: bool) -> tuple[Server, Path]:
    """``vm-tenant serve`` over a fresh data dir (returned too) with the embedded fleet."""
    port = free_port()
    data_dir = workdir / "proxy-data"
    argv = [str(VENV_BIN / "vm-tenant"), "serve", "--data-dir", str(data_dir)]
    argv += ["--bind", f"127.0.0.1:{port}", "--fleet", "embedded"]
    # The bench drives one or a few tenants at up to 64 connections at full speed to
    # measure throughput; the per-tenant limits (50 req/s, 32 spawns in flight by
    # default) would turn most of that into 429s, so they are switched off here.
    argv += ["--rate-limit", "0", "--max-inflight-spawns", "0"]
    metrics_port = free_port()
    argv += ["--metrics-bind", f"127.0.0.1:{metrics_port}"]
    server = start_server("proxy", argv, port, "/readyz", workdir, pinning, trace=trace)
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return server, data_dir
