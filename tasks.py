"""The project's two entry points: ``python3 tasks.py serve`` and ``python3 tasks.py test``.

Each one first makes sure ``.venv`` exists and holds this project (installed in editable
mode with its dev extras), reinstalling only when ``pyproject.toml`` changed. Only the
standard library is used here, so a machine with nothing but Python 3.11+ can run it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed-pyproject.sha256"


def ensure_venv() -> None:
    """Create ``.venv`` and install the project into it when ``pyproject.toml`` changed."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if not (BIN / "python").exists():
        print("creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(digest)


def run(argv: list[str]) -> int:
    """Run one command inside the venv and return its exit code."""
    return subprocess.run(argv, cwd=ROOT).returncode


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in {"serve", "test"}:
        print("usage: python3 tasks.py serve [serve options] | test [pytest options]")
        return 2
    ensure_venv()
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "serve":
        os.execv(str(BIN / "vm-tenant"), [str(BIN / "vm-tenant"), "serve", *rest])
    checks = (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"])
    for check in checks:
        if code := run([str(BIN / check[0]), *check[1:]]):
            return code
    return run([str(BIN / "python"), "-m", "pytest", *rest])


if __name__ == "__main__":
    sys.exit(main())
