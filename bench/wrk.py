"""Driving wrk: finding it, its command line, and the parser of the scenarios' JSON report.

Each scenario script (``bench/<scenario>.lua``) loads ``bench/common.lua``, whose
``done()`` hook prints one line ``BENCH_JSON {...}`` after wrk's own summary: request
count, duration, latency percentiles in microseconds, answers counted by status, socket
errors, and the writes the server acknowledged. :func:`parse_wrk_output` turns it into a
:class:`WrkResult`; answers that are not 2xx are kept apart (``non_2xx``), never averaged
into the throughput as if they were successes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPORT_PREFIX = "BENCH_JSON "
INSTALL_HINT = (
    "wrk (the HTTP load generator) is not on PATH. Install it with\n"
    "  apt-get update && apt-get install -y wrk      # Debian/Ubuntu\n"
    "  brew install wrk                              # macOS\n"
    "then run the benchmark again."
)
#: wrk waits this long for one answer before counting a timeout
WRK_TIMEOUT = "10s"


class WrkError(RuntimeError):
    """wrk failed, or printed no report line."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run as the scenario's ``done()`` hook reported it."""

    requests: int
    duration_s: float
    latency_us: dict[str, float]
    statuses: dict[int, int]
    socket_errors: dict[str, int]
    writes_acked: int

    @property
    def rps(self) -> float:
        """Answers per second, of any status (see :attr:`non_2xx`)."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if not 200 <= code < 300)

    @property
    def errors(self) -> int:
        """Socket-level failures: connect, read, write errors and timeouts."""
        return sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["statuses"] = {str(code): n for code, n in sorted(self.statuses.items())}
        data.update(rps=round(self.rps, 1), non_2xx=self.non_2xx, errors=self.errors)
        return data


def parse_wrk_output(text: str) -> WrkResult:
    """Read the ``BENCH_JSON`` line out of wrk's stdout (the last one, if several)."""
    lines = [line for line in text.splitlines() if line.startswith(REPORT_PREFIX)]
    if not lines:
        raise WrkError(f"wrk printed no {REPORT_PREFIX.strip()} line:\n{text[-2000:]}")
    raw = json.loads(lines[-1][len(REPORT_PREFIX) :])
    errors = {k: int(v) for k, v in raw["errors"].items() if k != "status"}
    return WrkResult(
        requests=int(raw["requests"]),
        duration_s=raw["duration_us"] / 1e6,
        latency_us={k: float(v) for k, v in raw["latency_us"].items()},
        statuses={int(code): int(n) for code, n in raw["statuses"].items()},
        socket_errors=errors,
        writes_acked=int(raw["writes_acked"]),
    )


def find_wrk() -> str | None:
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    """wrk's banner, e.g. ``wrk debian/4.1.0-3+b2 [epoll]``."""
    result = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    banner = (result.stdout + result.stderr).strip().splitlines()
    return banner[0].split(" Copyright")[0] if banner else "unknown"


def wrk_command(
    wrk: str, scenario: str, url: str, connections: int, duration_s: int, pin: list[str]
) -> list[str]:
    """One thread (wrk shares the load generator's core anyway), ``connections`` sockets."""
    script = BENCH_DIR / f"{scenario}.lua"
    return [
        *pin,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(script),
        url,
    ]


def run_wrk(command: list[str], data_file: Path, duration_s: int) -> WrkResult:
    """Run wrk to completion (bounded: killed after ``duration_s + 30`` seconds)."""
    env = {**os.environ, "BENCH_DATA": str(data_file)}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=duration_s + 30
        )
    except subprocess.TimeoutExpired as error:
        raise WrkError(f"wrk did not finish in {duration_s + 30} s") from error
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return parse_wrk_output(done.stdout)
