"""The signing keyring: the keys that sign tenant tokens and list cursors.

Each key has an id, a creation time and a state. The newest ``active`` key signs; every
``active`` key verifies, so rotating (adding a key) never breaks a token or cursor issued
before. Retiring a key drops its secret for good: whatever only it signed is refused from
then on. The key that signs cannot be retired (rotate first).

The keyring lives in ``<data-dir>/keys/token-signing.keyring.json`` (mode 0600), replaced
atomically (temp file, fsync, rename, fsync of the directory) on every change, so a crash
leaves either the old or the new keyring. A data dir from before the keyring holds a single
``token-signing.key``: it becomes the first key, and the old file is removed once the
keyring holding it is durable.

Changes are rare operator actions made on the running server; they are serialised by a
lock, written in a worker thread, and only then applied in memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from actors.fsutil import atomic_write, fsync_dir

log = logging.getLogger("vm_tenant.keys")

KEYRING_FILE = "token-signing.keyring.json"
LEGACY_KEY_FILE = "token-signing.key"
KEYRING_VERSION = 1

#: seconds since the epoch, wall-clock UTC
Clock = Callable[[], float]


def rfc3339(seconds: float) -> str:
    """Wall-clock seconds as an RFC 3339 UTC timestamp (whole seconds)."""
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SigningKey(msgspec.Struct):
    """One key: ``secret`` is None once it is retired."""

    id: str
    created_at: str
    state: Literal["active", "retired"]
    secret: str | None
    retired_at: str | None = None


class _KeyringFile(msgspec.Struct):
    version: int
    keys: list[SigningKey]


class KeyringError(Exception):
    """A keyring change that cannot be made; the message says why."""


class UnknownKey(KeyringError):
    """No key has that id."""


class SigningKeyInUse(KeyringError):
    """The key asked to be retired is the one that signs."""


def _new_key(clock: Clock, secret: str | None = None) -> SigningKey:
    return SigningKey(
        id=f"key-{secrets.token_hex(6)}",
        created_at=rfc3339(clock()),
        state="active",
        secret=secret or secrets.token_urlsafe(48),
    )


class Keyring:
    """The keys, in creation order; persisted to ``path`` unless it is None (tests)."""

    def __init__(self, keys: list[SigningKey], path: Path | None, clock: Clock) -> None:
        if not any(key.state == "active" for key in keys):
            raise KeyringError("the keyring holds no active key")
        if any(key.state == "active" and not key.secret for key in keys):
            raise KeyringError("an active key of the keyring has no secret")
        self._keys = keys
        self._path = path
        self._clock = clock
        self._lock = trio.Lock()
        #: bumped on every change, so users of :attr:`secrets` know when to rebuild
        self.version = 0

    @classmethod
    def in_memory(cls, secret: str, clock: Clock = time.time) -> Keyring:
        """A keyring of one key that is never written anywhere."""
        return cls([_new_key(clock, secret)], None, clock)

    @classmethod
    def open(cls, keys_dir: Path, clock: Clock = time.time) -> Keyring:
        """Load the keyring, migrating a legacy single key or creating a first key."""
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = keys_dir / KEYRING_FILE
        legacy = keys_dir / LEGACY_KEY_FILE
        if path.exists():
            try:
                stored = msgspec.json.decode(path.read_bytes(), type=_KeyringFile)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as error:
                raise KeyringError(f"{path}: unreadable keyring: {error}") from None
            if stored.version != KEYRING_VERSION:
                raise KeyringError(f"{path}: unknown keyring version {stored.version}")
            keyring = cls(stored.keys, path, clock)
        else:
            secret = legacy.read_text().strip() if legacy.exists() else None
            keyring = cls([_new_key(clock, secret)], path, clock)
            _write(path, keyring._keys)
            if secret is not None:
                log.info("migrated %s into the keyring as %s", legacy, keyring.current.id)
        if legacy.exists():
            # The keyring holds that secret now (durably); a retired key must not linger.
            legacy.unlink()
            fsync_dir(keys_dir)
        return keyring

    # -- reading -----------------------------------------------------------------------------

    @property
    def current(self) -> SigningKey:
        """The key that signs: the newest active one."""
        return [key for key in self._keys if key.state == "active"][-1]

    @property
    def secrets(self) -> list[str]:
        """Every verifying secret, oldest first: itsdangerous signs with the last."""
        return [key.secret for key in self._keys if key.state == "active" and key.secret]

    def describe(self) -> list[dict[str, Any]]:
        """The keys as the admin API shows them: never a secret."""
        current = self.current.id
        return [self._view(key, current) for key in self._keys]

    @staticmethod
    def _view(key: SigningKey, current: str) -> dict[str, Any]:
        return {
            "id": key.id,
            "created_at": key.created_at,
            "state": key.state,
            "signing": key.id == current,
            "retired_at": key.retired_at,
        }

    # -- changes -----------------------------------------------------------------------------

    async def rotate(self) -> dict[str, Any]:
        """Add a new key, which signs from now on; the older ones keep verifying."""
        async with self._lock:
            key = _new_key(self._clock)
            await self._commit([*self._keys, key])
            log.info("signing key %s added; it signs from now on", key.id)
            return self._view(key, key.id)

    async def retire(self, key_id: str) -> dict[str, Any]:
        """Stop trusting a key and forget its secret; retiring a retired key changes nothing."""
        async with self._lock:
            index = next((i for i, key in enumerate(self._keys) if key.id == key_id), None)
            if index is None:
                raise UnknownKey(f"no signing key {key_id!r}")
            key = self._keys[index]
            current = self.current.id
            if key.state == "retired":
                return self._view(key, current)
            if key.id == current:
                raise SigningKeyInUse(
                    f"{key_id} is the current signing key: rotate first, then retire it"
                )
            retired = SigningKey(key.id, key.created_at, "retired", None, rfc3339(self._clock()))
            keys = list(self._keys)
            keys[index] = retired
            await self._commit(keys)
            log.info("signing key %s retired; what only it signed is refused now", key_id)
            return self._view(retired, current)

    async def _commit(self, keys: list[SigningKey]) -> None:
        if self._path is not None:
            await trio.to_thread.run_sync(_write, self._path, keys)
        self._keys = keys
        self.version += 1


def _write(path: Path, keys: list[SigningKey]) -> None:
    atomic_write(path, msgspec.json.encode(_KeyringFile(KEYRING_VERSION, keys)), mode=0o600)
