"""The signing keyring: the keys that sign tenant tokens and list cursors.

Each key has an id, a creation time and a state. The newest ``active`` key signs; every
``active`` key verifies, so rotating (adding a key) never breaks a token or cursor issued
before. Retiring a key drops its secret for good: whatever only it signed is refused from
then on. The key that signs cannot be retired (rotate first).

The keys are kept by the store (:class:`~actors.store.KeyStorage`; the file store keeps
them in ``<data-dir>/keys/token-signing.keyring.json``, replaced atomically, so a crash
leaves either the old or the new keyring). Changes are rare operator actions made on the
running server; they are serialised by a lock, made durable in a worker thread, and only
then applied in memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable

import trio

from actors.store import KeyStorage, SigningKey
from server.responses import SigningKey as KeyView

log = logging.getLogger("vm_tenant.keys")

#: seconds since the epoch, wall-clock UTC
Clock = Callable[[], float]


def rfc3339(seconds: float) -> str:
    """Wall-clock seconds as an RFC 3339 UTC timestamp (whole seconds)."""
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    """The keys, in creation order; kept in ``storage`` unless it is None (tests)."""

    def __init__(self, keys: list[SigningKey], storage: KeyStorage | None, clock: Clock) -> None:
        if not any(key.state == "active" for key in keys):
            raise KeyringError("the keyring holds no active key")
        if any(key.state == "active" and not key.secret for key in keys):
            raise KeyringError("an active key of the keyring has no secret")
        self._keys = keys
        self._storage = storage
        self._clock = clock
        self._lock = trio.Lock()
        #: bumped on every change, so users of :attr:`secrets` know when to rebuild
        self.version = 0

    @classmethod
    def in_memory(cls, secret: str, clock: Clock = time.time) -> Keyring:
        """A keyring of one key that is never written anywhere."""
        return cls([_new_key(clock, secret)], None, clock)

    @classmethod
    def open(cls, storage: KeyStorage, clock: Clock = time.time) -> Keyring:
        """Load the stored keyring, or store a first key when there is none yet."""
        try:
            keys = storage.load()
            if keys is None:
                keys = [_new_key(clock)]
                storage.save(keys)
        except (OSError, ValueError) as error:
            raise KeyringError(str(error)) from None
        keyring = cls(keys, storage, clock)
        storage.watch(keyring._changed_elsewhere)
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

    def describe(self) -> list[KeyView]:
        """The keys as the admin API shows them: never a secret."""
        current = self.current.id
        return [self._view(key, current) for key in self._keys]

    @staticmethod
    def _view(key: SigningKey, current: str) -> KeyView:
        return KeyView(key.id, key.created_at, key.state, key.id == current, key.retired_at)

    # -- changes -----------------------------------------------------------------------------

    async def rotate(self) -> KeyView:
        """Add a new key, which signs from now on; the older ones keep verifying."""
        async with self._lock:
            key = _new_key(self._clock)
            await self._commit([*self._keys, key])
            log.info("signing key %s added; it signs from now on", key.id)
            return self._view(key, key.id)

    async def retire(self, key_id: str) -> KeyView:
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

    def _changed_elsewhere(self, keys: list[SigningKey]) -> None:
        """Another server sharing the storage changed the keys (replicas on one database)."""
        if any(key.state == "active" and key.secret for key in keys):
            self._keys = keys
            self.version += 1
            log.info("signing keys reloaded: changed by another replica")

    async def _commit(self, keys: list[SigningKey]) -> None:
        if self._storage is not None:
            await trio.to_thread.run_sync(self._storage.save, keys)
        self._keys = keys
        self.version += 1
