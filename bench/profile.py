"""Optional sampling profiles of both servers under load, with py-spy (``--profile``).

``py-spy record --nonblocking --format raw`` samples a server's Python stacks without
pausing it (strace already traces it, and a pausing profiler would distort the timing
more), from the load generator's core. py-spy drops idle samples, so the counts
approximate CPU time; a worker thread blocked in ``fsync`` still counts as busy (it
shows as ``AuditWriter._write_batch``). The raw output is collapsed stacks, one
``frame;frame;...;leaf COUNT`` line per distinct stack; :func:`summarise` splits the
samples by package and ranks functions. Profiling the floor and the proxy under the same
load shows where the proxy's extra CPU per request goes. Figures measured while
profiling are not comparable with a clean run.

Install it into the venv with ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: samples per second
RATE = 200
_LOCATION = re.compile(r"\s*\(([^()]*)\)\s*$")


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_recording(
    py_spy: str, pid: int, seconds: int, out: Path, *, pin: list[str]
) -> subprocess.Popen[bytes]:
    """Sample ``pid`` for ``seconds`` into ``out``; py-spy runs on the load generator's core."""
    command = [*pin, py_spy, "record", "--nonblocking", "--rate", str(RATE), "--format", "raw"]
    command += ["--duration", str(seconds), "--output", str(out), "--pid", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _split(frame: str) -> tuple[str, str]:
    """``name (path/to/module.py:123)`` -> (``name (to/module.py)``, top-level package)."""
    match = _LOCATION.search(frame)
    if not match:
        return frame.strip(), "?"
    where = match.group(1).rsplit(":", 1)[0]
    parts = Path(where).parts
    package = parts[0] if len(parts) > 1 else "stdlib"
    return f"{frame[: match.start()].strip()} ({'/'.join(parts[-2:])})", package


def summarise(raw: Path, *, requests: int = 0, top: int = 20) -> str:
    """CPU samples by package (of the innermost frame), then the ``top`` functions.

    *self* counts a sample for its innermost frame only; *inclusive* for every function
    on its stack. Packages are the first directory of py-spy's file names (``actors``,
    ``server``, ``trio``, ``quart``, ``hypercorn``, ``h11``, ...; ``stdlib`` for the
    standard library's top-level modules). With ``requests`` (answered during the
    recording) it also gives CPU milliseconds per request, per package.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_split(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1][0]] += n
        packages[frames[-1][1]] += n
        for name in {name for name, _ in frames}:
            inclusive[name] += n
    if not total:
        return f"{raw.name}: no samples"
    out = [f"{raw.name}: {total} samples"]
    shares = ", ".join(f"{p} {100 * n / total:.0f}%" for p, n in packages.most_common(12))
    out.append(f"  self by package: {shares}")
    if requests:
        per = {p: 1000 * n / RATE / requests for p, n in packages.most_common(12)}
        costs = ", ".join(f"{p} {ms:.3f}" for p, ms in per.items())
        out.append(f"  CPU ms per request ({requests} requests): {sum(per.values()):.3f}")
        out.append(f"    by package: {costs}")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        out.append(f"  top by {title}:")
        for name, n in counter.most_common(top):
            out.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)
