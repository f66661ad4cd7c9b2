"""The reference fleet controller (``tests/fleet_server.py``) as a subprocess of a test.

Its VMs are in a state file that survives a ``kill -9``; restarts reuse its port, so a
proxy keeps finding it. The fleet's own test routes (``/_knobs``, ``/_stats``, ``/_vms``)
are described in ``fleet_server.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

FLEET_SERVER = Path(__file__).with_name("fleet_server.py")
FLEET_LISTEN_RE = re.compile(r"fleet-server listening on (http://\S+)")


@dataclass
class FleetServer:
    """``tests/fleet_server.py`` as a subprocess; restarts reuse its port and state file."""

    state: Path
    bind: str = "127.0.0.1:0"
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    log: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> FleetServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(FLEET_SERVER), "--bind", self.bind, "--state", str(self.state)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            with self.proc.stderr:
                for line in self.proc.stderr:
                    self.log.append(line)
                    match = FLEET_LISTEN_RE.search(line)
                    if match and not found.is_set():
                        self.url = match.group(1)
                        found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        found.wait(timeout)
        if not self.url:
            self.kill()
            raise RuntimeError("fleet server did not start:\n" + "".join(self.log))
        # Later starts listen where the proxy already looks.
        self.bind = self.url.removeprefix("http://")
        return self

    def kill(self) -> None:
        """``kill -9``: the state file holds whatever was appended before."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)
        self.url = ""
