"""A really full file system for tests: a tiny tmpfs filled to its last byte.

The tmpfs lives in a mount namespace of its own, held by a ``sleep`` started with
``unshare --mount`` (plus ``--user --map-root-user`` when not root, so that no privilege is
needed): nothing is mounted on the host, and nothing is left mounted if a test dies. A
command runs inside with :meth:`FullTmpfs.command` (``nsenter``); the test reads and
writes the tmpfs from outside through ``/proc/<holder>/root`` (:meth:`FullTmpfs.view`).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from types import TracebackType


class FullTmpfs:
    """A ``size`` tmpfs at ``mountpoint`` (inside its namespace), filled by :meth:`fill`."""

    def __init__(self, mountpoint: Path, size: str = "64k") -> None:
        self.mountpoint = mountpoint
        self.size = size
        self._holder: subprocess.Popen[bytes] | None = None
        self._user = os.geteuid() != 0

    def __enter__(self) -> FullTmpfs:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        userns = ["--user", "--map-root-user"] if self._user else []
        script = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && echo ready && exec sleep infinity'
        self._holder = subprocess.Popen(
            ["unshare", *userns, "--mount", "--propagation", "private",
             "sh", "-c", script, "sh", self.size, str(self.mountpoint)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self._holder.stdout is not None
        if self._holder.stdout.readline() != b"ready\n":
            self.__exit__(None, None, None)
            raise RuntimeError("could not mount a tmpfs in a private mount namespace")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait(30)
            if self._holder.stdout is not None:
                self._holder.stdout.close()

    @property
    def pid(self) -> int:
        assert self._holder is not None
        return self._holder.pid

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace, where the tmpfs is mounted."""
        userns = ["--user", "--preserve-credentials"] if self._user else []
        return ["nsenter", f"--target={self.pid}", "--mount", *userns, *argv]

    def view(self, path: Path | None = None) -> Path:
        """``path`` (default: the mount point) as this process sees it, from outside."""
        inside = self.mountpoint if path is None else path
        return Path(f"/proc/{self.pid}/root") / inside.relative_to("/")

    def fill(self) -> None:
        """Take every free byte, so that the next write fails with ENOSPC."""
        with (self.view() / ".fill").open("wb", buffering=0) as f:
            chunk = b"\0" * 4096
            while True:
                try:
                    f.write(chunk)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
        # even a single byte must not fit any more
        try:
            (self.view() / ".probe").write_bytes(b"x")
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
        else:
            raise AssertionError("the tmpfs still takes writes")

    def listing(self) -> dict[str, tuple[int, int, int]]:
        """Every path under the mount point but the filler: (size, inode, mtime in ns)."""
        root = self.view()
        found: dict[str, tuple[int, int, int]] = {}
        for directory, subdirs, files in os.walk(root):
            for name in (*subdirs, *files):
                path = Path(directory) / name
                relative = str(path.relative_to(root))
                if relative not in (".fill", ".probe"):
                    info = path.lstat()
                    found[relative] = (
                        (info.st_size, info.st_ino, info.st_mtime_ns)
                        if name in files
                        else (-1, info.st_ino, 0)  # a directory's mtime moves with its entries
                    )
        return found
