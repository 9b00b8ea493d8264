"""The identity assertion's keys: which one signs now, and which ones the JWKS publishes.

Three sources, and why:

* ``assertion.key`` / ``assertion.key_file``: the operator's EC P-256 key signs, and it and
  ``assertion.published_keys`` are published. Rotation is the operator's, in three deploys
  (publish the next key, sign with it, drop the old one), documented in ``config/example.yaml``.
* No key, ``session.store: redis``: every replica must sign with keys every other replica
  publishes, so keys live in Redis. Time is cut in slots of ``assertion.rotate_every``
  (:func:`gateway.assertion.generation`); the first replica that needs slot g's key makes it
  and stores it with SET NX, every other one (whose SET NX fails) reads the winner's. No
  leader, no lock, and no two keys for one slot. The private key is sealed (AES-GCM, under
  ``session.keys`` like sessions), so a Redis dump cannot forge assertions.
* No key, ``session.store: memory``: the same slots in this process's memory; one process
  publishes what it signs with. Keys made at start, lost at restart (as sessions are).

The slot key under a session key's fingerprint: after a ``session.keys`` rotation every replica
reads the slots sealed under each of its keys (all are published) and makes new ones only
under the first, as sessions do.

Per request the key is a dictionary lookup; the store is asked once per slot and process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Protocol

from gateway.assertion import (
    AssertionKey,
    generation,
    load_key,
    new_key,
    private_pem,
    published_generations,
    slot_ttl,
)
from gateway.config import AssertionConfig, Config
from gateway.errors import ConfigError, ConfigProblem, SessionStoreError
from gateway.sessions import SessionInvalid, key_fingerprint, seal, unseal
from gateway.store import RedisStore

__all__ = ["AssertionKeys", "KeySlots", "MemorySlots", "RedisSlots", "key_settings"]

log = logging.getLogger(__name__)

# The HKDF secret the slot keys are sealed under (with each session key): its own domain, so
# a sealed assertion key can never be opened as a session, nor a session as a key.
_SEAL_SECRET: Final = b"oidc-gateway assertion signing key"
# A slot found empty is asked for again after this long, not on every JWKS request.
_MISS_TTL: Final = 10.0


class KeySlots(Protocol):
    """Where generated keys are kept: get, and set only if absent (the replicas' agreement)."""

    async def get(self, key: str) -> bytes | None: ...

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` for ``ttl`` seconds unless ``key`` holds a value: True if stored."""
        ...

    async def close(self) -> None: ...


class MemorySlots:
    """Slots of one process (``session.store: memory``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}

    async def get(self, key: str) -> bytes | None:
        found = self._data.get(key)
        if found is None or found[1] <= self._clock():
            return None
        return found[0]

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        now = self._clock()
        for name in [k for k, (_, until) in self._data.items() if until <= now]:
            del self._data[name]
        if key in self._data:
            return False
        self._data[key] = (value, now + ttl)
        return True

    async def close(self) -> None:
        self._data.clear()


class RedisSlots(RedisStore):
    """The session store's Redis (same server, Sentinel or Cluster settings, timeouts and key
    prefix), used for its SET NX so that every replica signs with the same key."""

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        return await self.set_new(key, value, ttl)


def _config_problem(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(path, message)])


def check_key_file(config: Config) -> None:
    """For ``oidc-gateway check``: raise :class:`ConfigError` when a route signs assertions
    with ``assertion.key_file`` and that file cannot be read or holds no usable key."""
    if config.assertion.key_file is not None and any(r.assertion for r in config.routes):
        _read_key_file(Path(config.assertion.key_file))


def _read_key_file(path: Path) -> AssertionKey:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise _config_problem("assertion.key_file", f"{path} cannot be read: {reason}") from None
    try:
        key = load_key(text)
    except ValueError as exc:
        raise _config_problem("assertion.key_file", f"{path}: {exc}") from None
    if not key.private:
        raise _config_problem(
            "assertion.key_file", f"{path} holds a public key; signing needs the private one"
        )
    return key


class AssertionKeys:
    """The signing key of the moment and the keys to publish (see the module docstring)."""

    def __init__(
        self,
        settings: AssertionConfig,
        *,
        configured: AssertionKey | None,
        published: Sequence[AssertionKey] = (),
        slots: KeySlots | None = None,
        seal_keys: Sequence[bytes] = (),
        clock: Callable[[], float] = time.time,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if configured is None and (slots is None or not seal_keys):
            raise ValueError("generated keys need slots and session keys to seal them")
        self.lifetime = settings.lifetime
        self.rotate_every = settings.rotate_every
        self._configured = configured
        self._published = tuple(published)
        self._slots = slots
        self._seal_keys = tuple(seal_keys)
        self._fingerprints = tuple(dict.fromkeys(key_fingerprint(k) for k in seal_keys))
        self._clock = clock
        self._token_bytes = token_bytes
        self._keys: dict[tuple[bytes, int], AssertionKey] = {}
        self._missing: dict[tuple[bytes, int], float] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def open(
        cls,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> AssertionKeys | None:
        """The keys ``config.assertion`` describes, or None when no route has ``assertion:
        true``. Raises :class:`ConfigError` when ``assertion.key_file`` cannot be read or
        holds no EC P-256 private key. (The file is small and read once, at start or reload.)
        """
        if not any(route.assertion for route in config.routes):
            return None
        settings = config.assertion
        configured: AssertionKey | None = None
        if settings.key is not None:
            configured = load_key(settings.key.get_secret_value())  # checked by the config
        elif settings.key_file is not None:
            configured = _read_key_file(Path(settings.key_file))
        published = [load_key(k.get_secret_value()) for k in settings.published_keys]
        slots: KeySlots | None = None
        if configured is None:
            if config.session.store == "memory":
                slots = MemorySlots(clock)
            else:
                store = RedisSlots.from_config(config.session)
                if not isinstance(store, RedisSlots):  # from_config builds cls(...)
                    raise TypeError("RedisStore.from_config did not build a RedisSlots")
                slots = store
        return cls(
            settings, configured=configured, published=published, slots=slots,
            seal_keys=config.session.key_bytes, clock=clock, token_bytes=token_bytes,
        )

    async def start(self) -> None:
        """Have the current key ready before the first request. A store that is down now is
        no reason not to start: the first assertion asks again (and fails closed, 503)."""
        try:
            key = await self.signing_key()
        except SessionStoreError as exc:
            log.warning("assertion key not loaded yet", extra={"detail": exc.message})
            return
        log.info("assertion signing key", extra={"kid": key.kid,
                                                 "source": self.source})

    @property
    def source(self) -> str:
        return "config" if self._configured is not None else "generated"

    async def close(self) -> None:
        if self._slots is not None:
            await self._slots.close()

    # ------------------------------------------------------------------ keys

    async def signing_key(self) -> AssertionKey:
        """The key that signs now. Raises :class:`SessionStoreError` (503) when a generated
        key must be fetched and the store fails: no assertion rather than an unverifiable one.
        """
        if self._configured is not None:
            return self._configured
        slot = generation(self._clock(), self.rotate_every)
        key = self._keys.get((self._fingerprints[0], slot))
        if key is not None:
            return key
        async with self._lock:
            key = await self._slot_key(self._fingerprints[0], slot, create=True)
            self._forget(slot)
        if key is None:  # set-if-absent lost, and the winner's key expired at once: a fault
            raise SessionStoreError("the assertion key for this period is missing from the store")
        return key

    async def published(self) -> list[AssertionKey]:
        """The keys of the JWKS now: see :func:`gateway.assertion.published_generations`."""
        if self._configured is not None:
            return [self._configured, *self._published]
        now = self._clock()
        current = generation(now, self.rotate_every)
        slots = published_generations(now, rotate_every=self.rotate_every,
                                      lifetime=self.lifetime)
        out: list[AssertionKey] = []
        async with self._lock:
            for fingerprint in self._fingerprints:
                for slot in slots:
                    # The current and next slot of the first session key are made if absent:
                    # the next one must be published before any replica signs with it.
                    create = fingerprint == self._fingerprints[0] and slot >= current
                    key = await self._slot_key(fingerprint, slot, create=create)
                    if key is not None:
                        out.append(key)
            self._forget(current)
        return [*out, *self._published]

    def _name(self, fingerprint: bytes, slot: int) -> str:
        return f"assertion:{fingerprint.hex()}:{slot}"

    async def _slot_key(
        self, fingerprint: bytes, slot: int, *, create: bool
    ) -> AssertionKey | None:
        cached = self._keys.get((fingerprint, slot))
        if cached is not None:
            return cached
        now = self._clock()
        if not create and now - self._missing.get((fingerprint, slot), -math.inf) < _MISS_TTL:
            return None
        slots = self._slots
        if slots is None:
            return None
        name = self._name(fingerprint, slot)
        blob = await slots.get(name)
        key: AssertionKey | None = None
        if blob is None and create:
            made = new_key()
            sealed = seal(private_pem(made), key=self._seal_keys[0], secret=_SEAL_SECRET,
                          aad=name.encode(), nonce_bytes=self._token_bytes(12))
            ttl = slot_ttl(slot, now, rotate_every=self.rotate_every, lifetime=self.lifetime)
            if await slots.add(name, sealed, ttl):
                key = made
                log.info("assertion key made", extra={"kid": made.kid, "slot": slot})
            else:  # another replica was first: use its key
                blob = await slots.get(name)
        if key is None and blob is not None:
            try:
                key = load_key(unseal(blob, keys=self._seal_keys, secret=_SEAL_SECRET,
                                      aad=name.encode()))
            except (SessionInvalid, ValueError) as exc:
                raise SessionStoreError(
                    f"the assertion key {name} in the store does not open ({exc}); was it "
                    "written by a gateway with other session.keys?"
                ) from None
        if key is None:
            self._missing[(fingerprint, slot)] = now
            return None
        self._missing.pop((fingerprint, slot), None)
        self._keys[(fingerprint, slot)] = key
        return key

    def _forget(self, current: int) -> None:
        """Drop cached keys of slots that left the JWKS for good."""
        for cache in (self._keys, self._missing):
            for entry in [e for e in cache if e[1] < current - 1]:
                del cache[entry]


def key_settings(config: Config) -> tuple[object, ...]:
    """What :meth:`AssertionKeys.open` builds from: a config reload that changes none of it
    keeps the keys object (and a memory slot's key stays published for its assertions)."""
    session = config.session
    return (
        any(route.assertion for route in config.routes), config.assertion, session.store,
        session.keys, session.redis_url, session.redis, session.key_prefix,
        session.redis_timeout,
    )
