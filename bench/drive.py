"""The measuring itself: wrk runs against both servers in alternation, and the fsync probe.

:class:`Bench` holds what every run needs. :meth:`Bench.matrix` runs every scenario x
concurrency x round, floor then proxy, against servers that are *not* traced, so the
throughput and latency figures carry no measuring cost; the audit log of that proxy
still yields its audit batches per run (``bench/fsyncs.py``), at no cost, and the
proxy's own counters are scraped from its ``/metrics`` listener before and after every
run (``bench/metrics.py``: audit fsyncs, batches, entries, failures, acknowledged writes).
:meth:`Bench.fsync_probe` then starts a second proxy under strace (seccomp filter, only
the sync calls stop) and runs the spawn scenario at each concurrency against it alone,
to count *every* sync of the process per acknowledged write. Tracing is kept out of the
matrix because, at concurrency 1, a spawn waits for two fsyncs in a row and the ptrace
stops around each of them cost a measurable share of its throughput.

Each run also records the server's CPU time (user and system, ``/proc/PID/stat``) and,
with ``--profile``, a py-spy recording of the server (``bench/profile.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import fsyncs, metrics
from bench.profile import start_recording, summarise
from bench.provision import provision, write_data_file
from bench.servers import Pinning, Server, start_proxy
from bench.wrk import run_wrk, wrk_command

Run = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    scenarios: list[str]
    concurrency: list[int]
    duration: int
    rounds: int
    warmup: int
    tenants: int
    status_vms: int
    pause: float
    fsync_probe: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "scenarios": self.scenarios,
            "concurrency": self.concurrency,
            "duration_s": self.duration,
            "rounds": self.rounds,
            "warmup_s": self.warmup,
            "mix_tenants": self.tenants,
            "status_vms": self.status_vms,
            "fsync_probe": self.fsync_probe,
        }


def prepare_data(proxy: Server, data_dir: Path, plan: Plan, workdir: Path) -> dict[str, Path]:
    """Provision the proxy; the data files of the single tenant and of the mix."""
    admin = (data_dir / "admin.token").read_text().strip()
    began = time.monotonic()
    solo = provision(proxy.url, admin, ["solo"], plan.status_vms)
    files = {"solo": write_data_file(workdir / "solo.txt", solo)}
    if "mix" in plan.scenarios:
        names = [f"mix-{i:05d}" for i in range(plan.tenants)]
        files["mix"] = write_data_file(workdir / "mix.txt", provision(proxy.url, admin, names, 1))
    tenants = 1 + (plan.tenants if "mix" in plan.scenarios else 0)
    print(f"provisioned {tenants} tenant(s) in {time.monotonic() - began:.1f} s", flush=True)
    return files


def attach_syncs(runs: list[Run], server: Server) -> None:
    """Every sync call strace saw inside each run's window."""
    if server.trace_path is None or not server.trace_path.exists():
        return
    times = fsyncs.sync_times(server.trace_path)
    durations = fsyncs.sync_durations(server.trace_path)
    for run in runs:
        run["syncs"] = fsyncs.count_in(times, run["start"], run["end"])
        mean = fsyncs.mean_duration_in(durations, run["start"], run["end"])
        run["sync_mean_ms"] = round(1000 * mean, 3)


@dataclass(slots=True)
class Bench:
    """Everything a run needs: the plan, wrk, pinning, both servers and their data."""

    plan: Plan
    wrk: str
    pinning: Pinning
    floor: Server
    proxy: Server
    data: dict[str, Path]
    workdir: Path
    py_spy: str | None = None

    def one_run(
        self, server: Server, scenario: str, conc: int, label: str, *,
        seconds: int | None = None, data: Path | None = None,
    ) -> Run:  # fmt: skip
        seconds = seconds or self.plan.duration
        data = data or self.data["mix" if scenario == "mix" else "solo"]
        command = wrk_command(self.wrk, scenario, server.url, conc, seconds, self.pinning.load)
        recorder, raw = None, None
        if self.py_spy is not None and label[0].isdigit():
            index = label.split("/")[0]
            raw = self.workdir / f"profile-{server.name}-{scenario}-c{conc}-r{index}.txt"
            recorder = start_recording(self.py_spy, server.pid, seconds, raw, pin=self.pinning.load)
        # Scraped outside the CPU and time windows, so the scrapes cost the run nothing.
        before = metrics.scrape(server.metrics_url) if server.metrics_url else None
        cpu_before = server.cpu_seconds()
        start = time.time()
        result = run_wrk(command, data, seconds)
        end = time.time()
        cpu_after = server.cpu_seconds()
        after = metrics.scrape(server.metrics_url) if server.metrics_url else None
        if recorder is not None:
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        run: Run = {"scenario": scenario, "concurrency": conc, "server": server.name}
        run.update(round=label, start=start, end=end, **result.to_json())
        run["cpu_user_s"] = round(cpu_after[0] - cpu_before[0], 3)
        run["cpu_sys_s"] = round(cpu_after[1] - cpu_before[1], 3)
        if before is not None and after is not None:
            run.update(metrics.delta(before, after))
        if raw is not None:
            run["profile"] = raw.name
        lat = result.latency_us
        print(
            f"{scenario:>6} c={conc:<3} {label:>6} {server.name:<5} {result.rps:8.0f} rps  "
            f"p50 {lat['p50'] / 1000:7.2f} ms  p99 {lat['p99'] / 1000:7.2f} ms  "
            f"non-2xx {result.non_2xx}  socket errors {result.errors}",
            flush=True,
        )
        time.sleep(self.plan.pause)
        return run

    def matrix(self) -> list[Run]:
        """Every scenario x concurrency x round, floor then proxy; returns measured runs."""
        runs: list[Run] = []
        plan = self.plan
        for scenario in plan.scenarios:
            if plan.warmup:
                for server in (self.floor, self.proxy):
                    self.one_run(server, scenario, 16, "warmup", seconds=plan.warmup)
            for conc in plan.concurrency:
                for index in range(plan.rounds):
                    for server in (self.floor, self.proxy):
                        runs.append(
                            self.one_run(server, scenario, conc, f"{index + 1}/{plan.rounds}")
                        )
        return runs

    def fsync_probe(self) -> list[Run]:
        """A traced proxy of its own, spawn at each concurrency: every sync counted."""
        workdir = self.workdir / "probe"
        workdir.mkdir()
        proxy, data_dir = start_proxy(workdir, self.pinning, trace=True)
        try:
            admin = (data_dir / "admin.token").read_text().strip()
            data = write_data_file(workdir / "solo.txt", provision(proxy.url, admin, ["solo"], 1))
            runs = [
                self.one_run(proxy, "spawn", conc, "probe", data=data)
                for conc in self.plan.concurrency
            ]
        finally:
            proxy.stop()
        attach_syncs(runs, proxy)
        return runs


def keep_profiles(runs: list[Run], workdir: Path, results: Path, stamp: str) -> list[str]:
    """Copy the raw profiles next to the results and summarise each one."""
    results.mkdir(parents=True, exist_ok=True)
    texts = []
    for run in runs:
        raw = workdir / run.get("profile", "-")
        if raw.is_file():
            kept = results / f"{stamp}-{raw.name}"
            shutil.copyfile(raw, kept)
            run["profile"] = kept.name
            texts.append(summarise(kept, requests=run["requests"]))
    return texts
