"""Locks in a Redis server, shared by several hosts: `RedisLocks`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ._base import ENV_VAR, PollingLocks, check_seconds, logger

if TYPE_CHECKING:
    import redis

# Redis socket timeouts (seconds) unless the URL sets its own.
REDIS_TIMEOUT = 10.0

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class _Lease:
    holder: str
    value: bytes  # what the Redis key holds while this lock is ours
    until: float | None  # time.monotonic() when the hold timeout passes


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisLocks(PollingLocks[_Lease]):
    """Locks in a Redis server, shared by every host that reaches it.

    A lock is the key ``<prefix><key>``, set with ``SET NX PX`` to a value
    unique to this acquisition (it names the holder, host and PID). A thread of
    the holding process renews the expiry every ``lease_seconds / 3``; when
    the holder dies or loses Redis, renewal stops and Redis drops the key at
    most ``lease_seconds`` later. Releasing and renewing compare the value
    first (in a Lua script), so a holder never releases a lock it lost.

    Parameters
    ----------
    url : str
        A redis-py URL: ``redis://[[user]:password@]host:port/db``,
        ``rediss://...`` (TLS) or ``unix:///path/to/socket?db=N``. Socket
        timeouts default to 10 s.
    lease_seconds : float, default=30.0
        How long a lock outlives a holder that stopped renewing it: the bound
        on the release of a dead holder's lock. Longer leases tolerate longer
        freezes of a live holder (a stop of the process, a long pause of Python
        threads) before it loses its lock.
    max_wait : float, default=3600.0
        Most seconds ``acquire_lock`` and ``wait_for_lock`` wait when called
        without a timeout.
    poll_interval : float, default=0.1
        Seconds between two attempts on a held lock.
    prefix : str, default="samplepipe:lock:"
        Prefix of the Redis keys.

    See Also
    --------
    CrashSafeFileLocks : Locks of one host, without a server.
    lock_manager_from_url : Pick a lock manager from a URL or ``SAMPLEPIPE_LOCKS``.

    Notes
    -----
    Connecting is lazy: creating the manager does not contact the server.
    Pickling keeps the configuration only; the copy holds no locks.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = 30.0,
        max_wait: float = 3600.0,
        poll_interval: float = 0.1,
        prefix: str = "samplepipe:lock:",
    ) -> None:
        import redis

        name = type(self).__name__
        self.url = url
        self.lease_seconds = check_seconds(
            name, "lease_seconds", lease_seconds, zero=False
        )
        self.prefix = prefix
        super().__init__(max_wait=max_wait, poll_interval=poll_interval)
        try:
            self._client: redis.Redis = redis.Redis.from_url(
                url,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
            )
        except ValueError as exc:
            msg = (
                f"{name} got url={redacted(url)!r}: {exc}. Expected "
                "redis://host:port/db, rediss://host:port/db or "
                "unix:///path/to/socket?db=N."
            )
            raise ValueError(msg) from exc
        self._renewer: threading.Thread | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({redacted(self.url)!r}, "
            f"lease_seconds={self.lease_seconds!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "lease_seconds": self.lease_seconds,
            "max_wait": self.max_wait,
            "poll_interval": self.poll_interval,
            "prefix": self.prefix,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _forget_after_fork(self) -> None:
        # The parent keeps renewing its locks; the child holds none.
        super()._forget_after_fork()
        self._renewer = None

    def _redis_key(self, key: str) -> str:
        return self.prefix + key

    def _value(self, key: str) -> bytes | None:
        value = self._client.get(self._redis_key(key))
        # A URL with decode_responses=true makes redis-py return str.
        return value.encode() if isinstance(value, str) else value

    @contextlib.contextmanager
    def _reaching_redis(self) -> Iterator[None]:
        import redis

        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            msg = (
                f"{type(self).__name__} could not reach Redis at "
                f"{redacted(self.url)!r}: {exc}. Check that the server runs and "
                f"that {ENV_VAR} (or the URL given) names it."
            )
            raise ConnectionError(msg) from exc

    def _describe(self, key: str) -> str:
        with self._reaching_redis():
            value = self._value(key)
            ttl = self._client.pttl(self._redis_key(key))
        if value is None:
            return "now free"
        try:
            r = json.loads(value)
        except ValueError:
            r = {"holder": value}
        return (
            f"held by holder {r.get('holder')!r} (pid {r.get('pid')} on host "
            f"{r.get('host')!r}, lease {ttl / 1000:g} s left)"
        )

    def _try_acquire(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        rkey = self._redis_key(key)
        with self._mutex:
            mine = self._held.get(key)
        with self._reaching_redis():
            if mine is not None:
                if self._value(key) == mine.value:
                    return mine.holder == holder
                with self._mutex:
                    self._held.pop(key, None)  # lost: expired or hold timeout
            record = {
                "holder": holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "nonce": uuid.uuid4().hex,
            }
            value = json.dumps(record).encode()
            ttl = self.lease_seconds
            until = None
            if hold_timeout is not None:
                ttl = min(ttl, hold_timeout)
                until = time.monotonic() + hold_timeout
            if not self._client.set(rkey, value, nx=True, px=max(1, int(ttl * 1000))):
                return False
        with self._mutex:
            self._held[key] = _Lease(holder, value, until)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever,
                    name=f"samplepipe-lock-renewer-{os.getpid()}",
                    daemon=True,
                )
                self._renewer.start()
        return True

    def _renew_forever(self) -> None:
        """Renew every held lock each ``lease_seconds / 3`` while any is held."""
        import redis

        me = threading.current_thread()
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._mutex:
                if self._renewer is not me:  # forked, or replaced
                    return
                if not self._held:
                    self._renewer = None
                    return
                leases = list(self._held.items())
            for key, lease in leases:
                ttl = self.lease_seconds
                if lease.until is not None:
                    ttl = min(ttl, lease.until - time.monotonic())
                    if ttl <= 0:  # the hold timeout passed: let it expire
                        self._drop(key, lease)
                        continue
                try:
                    renewed = self._client.eval(
                        _RENEW,
                        1,
                        self._redis_key(key),
                        lease.value,
                        max(1, int(ttl * 1000)),
                    )
                except redis.RedisError as exc:
                    logger.warning(
                        "Could not renew the lock of key %r at %s (%s); it expires "
                        "within lease_seconds=%g s unless renewed.",
                        key,
                        redacted(self.url),
                        exc,
                        self.lease_seconds,
                    )
                    continue
                if not renewed and self._drop(key, lease):
                    logger.warning(
                        "Lost the lock of key %r at %s: it expired before it was "
                        "renewed (this process paused for over lease_seconds=%g "
                        "s?). Another process may compute the same batch.",
                        key,
                        redacted(self.url),
                        self.lease_seconds,
                    )

    def _drop(self, key: str, lease: _Lease) -> bool:
        with self._mutex:
            if self._held.get(key) is lease:
                del self._held[key]
                return True
        return False

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock of ``key`` taken by ``holder``.

        Releasing a lock that nobody holds (any more) does nothing. If Redis
        cannot be reached, a warning is logged: the lock expires by itself
        within ``lease_seconds``.

        Raises
        ------
        ValueError
            The lock is held by another holder.
        """
        import redis

        mine = self._held_by(key, holder, forget=True)
        if mine is None:
            self._release_unheld(key, holder)
            return
        try:
            self._client.eval(_RELEASE, 1, self._redis_key(key), mine.value)
        except redis.RedisError as exc:
            logger.warning(
                "Could not release the lock of key %r at %s (%s); it expires "
                "within lease_seconds=%g s.",
                key,
                redacted(self.url),
                exc,
                self.lease_seconds,
            )

    def is_locked(self, key: str) -> bool:
        """Whether a holder (on any host) holds the lock of ``key``."""
        with self._reaching_redis():
            return bool(self._client.exists(self._redis_key(key)))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder``, in this process, holds the lock of ``key``."""
        mine = self._held_by(key, holder)
        if mine is None:
            return False
        with self._reaching_redis():
            return self._value(key) == mine.value
