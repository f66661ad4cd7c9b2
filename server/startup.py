"""Start-up of ``vm-tenant serve``: settings and logs first, then a data dir claimed so that
a start that fails leaves nothing behind.

:func:`configure_serve` resolves the settings and sets up the log pipeline before anything else
is logged, so every line after it (the warning about a misspelt ``VM_TENANT_*`` variable
included) has the one chosen format.

:func:`claim_data_dir` holds the data dir while the server starts and runs:

- it takes an exclusive ``flock`` on the data dir itself (no lock file), so a second
  server on the same data dir stops at once instead of writing a second chain into it;
- until :meth:`Claim.started` (called once the API listens), a start that fails for any
  reason (port in use, unusable keyring, full disk, damaged log, a signal) removes every
  file and directory it created, the data dir and its missing parents included, and
  leaves what it found. One exception: an audit segment that holds entries is never
  removed (no code path deletes an audit entry);
- an ``OSError`` of the start (``ENOSPC``, ``EACCES``, ``EROFS``...) becomes a one-line
  :class:`~actors.errors.StartupError` naming the data dir, the error and the file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from actors.errors import StartupError
from actors.journal.segments import list_segments
from server import settings
from server.logs import configure_logging

log = logging.getLogger("vm_tenant")


def configure_serve(
    args: Any, environ: Mapping[str, str] | None = None
) -> settings.Resolved | None:
    """Resolve serve's settings and set up the log pipeline; None after printing problems.

    Invalid settings are printed as plain lines (logging is not set up then: its format
    and level are among the settings), with any misspelt ``VM_TENANT_*`` name first.
    """
    environ = os.environ if environ is None else environ
    try:
        resolved = settings.from_args(args, environ)
    except settings.SettingsError as error:
        lines = [f"vm-tenant: warning: {w}" for w in settings.typo_warnings(environ)]
        with suppress(OSError, ValueError):  # even a full stderr must not change the exit
            print("\n".join([*lines, str(error)]), file=sys.stderr, flush=True)
        return None
    chosen = resolved.settings
    configure_logging(chosen.log_format, level=chosen.log_level, take_stderr=True)
    for warning in settings.typo_warnings(environ):
        log.warning("%s", warning)
    return resolved


class Claim:
    """A data dir held by this server: its lock, and what a failed start must take back."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._created_dirs: list[Path] = []  # the data dir and missing parents, outermost first
        self._found: set[Path] = set()
        self._fd = -1
        self.running = False

    def started(self) -> None:
        """The server listens: from now on nothing it made is taken back."""
        self.running = True

    def _take(self) -> None:
        self._created_dirs = _make_dirs(self.data_dir)
        try:
            self._fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release()
            raise StartupError(
                f"cannot start on {self.data_dir}: another vm-tenant serve is using it"
            ) from None
        except OSError:
            self._release()
            self._remove_created_dirs()
            raise
        self._found = set(_tree(self.data_dir))

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = -1

    def _take_back(self) -> None:
        """Remove what the start created, deepest first; keep audit segments with entries."""
        kept = set(self._found)
        segments = set(list_segments(self.data_dir / "audit"))
        for path in sorted(set(_tree(self.data_dir)) - kept, key=_depth, reverse=True):
            with suppress(FileNotFoundError):
                if path in segments and path.stat().st_size > 0:
                    log.warning("kept %s: it holds audit entries", path)
                    continue
                if path.is_dir() and not path.is_symlink():
                    with suppress(OSError):  # not empty: it holds something kept
                        path.rmdir()
                else:
                    path.unlink()
        self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for directory in reversed(self._created_dirs):
            with suppress(OSError):
                directory.rmdir()


@contextmanager
def claim_data_dir(data_dir: Path) -> Iterator[Claim]:
    """Hold ``data_dir`` for a server's start and run (see the module docstring)."""
    held = Claim(data_dir)
    try:
        held._take()
    except OSError as error:
        raise _startup_error(data_dir, error) from None
    try:
        yield held
    except BaseException as error:
        if held.running:
            raise
        try:
            held._take_back()
        except OSError as cleanup:
            log.error("could not remove what the failed start created: %s", cleanup)
        failure = _os_error(error)
        if failure is not None:
            raise _startup_error(data_dir, failure) from None
        raise
    finally:
        held._release()


# -- helpers -------------------------------------------------------------------------------------


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p`` (the last one mode 0700); the directories it made, outermost first."""
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    made: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700 if directory == path else 0o777)
        except FileExistsError:
            continue  # someone else made it at the same moment: not ours to remove
        except OSError:
            for done in reversed(made):
                with suppress(OSError):
                    done.rmdir()
            raise
        made.append(directory)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    return made


def _tree(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (not following symlinks), ``root`` itself excluded."""
    for directory, subdirs, files in os.walk(root):
        base = Path(directory)
        for name in (*subdirs, *files):
            yield base / name


def _depth(path: Path) -> int:
    return len(path.parts)


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error`` when that is all it is (a group of only those)."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(OSError)
        if rest is None and matched is not None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, OSError) else None
    return None


def _startup_error(data_dir: Path, error: OSError) -> StartupError:
    reason = (error.strerror or str(error)).lower()
    where = f" ({error.filename})" if error.filename else ""
    return StartupError(f"cannot start on {data_dir}: {reason}{where}")
