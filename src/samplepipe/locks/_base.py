"""The polling base class shared by samplepipe's lock managers, and its helpers.

A backend (see `samplepipe.locks._files`, `samplepipe.locks._redis`) subclasses
`PollingLocks` and implements one non-blocking attempt (``_try_acquire``),
``is_locked``, ``is_lock_holder``, ``release_lock`` and ``_describe``; the
base gives it Prefect's whole ``LockManager`` protocol with bounded waits,
async variants and a clean state in forked children.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Generic, Protocol, TypeVar

from ..errors import LockTimeoutError

# One logger for every backend, named as before the package split, so that
# logging configured for "samplepipe.locks" keeps matching.
logger = logging.getLogger("samplepipe.locks")

ENV_VAR = "SAMPLEPIPE_LOCKS"
"""The environment variable `lock_manager_from_url` reads when given no URL."""

# Managers whose per-process state a forked child must drop (see _after_fork).
_INSTANCES: weakref.WeakSet[PollingLocks[Any]] = weakref.WeakSet()


def _after_fork() -> None:
    for manager in list(_INSTANCES):
        manager._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork)


def check_seconds(owner: str, name: str, value: object, *, zero: bool) -> float:
    """``value`` as a float of seconds; `TypeError`/`ValueError` naming ``owner``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{owner} got {name}={value!r}; expected a number of seconds."
        raise TypeError(msg)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        msg = f"{owner} got {name}={value!r}; expected a finite number {bound}."
        raise ValueError(msg)
    return float(value)


class Holding(Protocol):
    """What a manager keeps of a lock this process holds."""

    @property
    def holder(self) -> str: ...


_H = TypeVar("_H", bound=Holding)


class PollingLocks(Generic[_H]):
    """Bounded waits and async variants shared by samplepipe's lock managers.

    Subclasses implement ``_try_acquire`` (one attempt, never waits),
    ``is_locked``, ``is_lock_holder``, ``release_lock`` and ``_describe``; they
    keep the locks this process holds in ``_held`` (key -> record), guarded
    by ``_mutex``.
    """

    def __init__(self, *, max_wait: float, poll_interval: float) -> None:
        name = type(self).__name__
        self.max_wait = check_seconds(name, "max_wait", max_wait, zero=False)
        self.poll_interval = check_seconds(
            name, "poll_interval", poll_interval, zero=False
        )
        self._held: dict[str, _H] = {}
        self._mutex = threading.Lock()
        _INSTANCES.add(self)

    def _try_acquire(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        raise NotImplementedError

    def _describe(self, key: str) -> str:
        raise NotImplementedError

    def _forget_after_fork(self) -> None:
        """Drop the held locks: they belong to the parent process."""
        self._mutex = threading.Lock()
        self._held = {}

    def is_locked(self, key: str) -> bool:
        raise NotImplementedError

    def _held_by(self, key: str, holder: str, *, forget: bool = False) -> _H | None:
        """The record of the lock of ``key`` if ``holder`` holds it here, else None.

        With ``forget``, the lock is also dropped from the held locks.
        """
        with self._mutex:
            mine = self._held.get(key)
            if mine is None or mine.holder != holder:
                return None
            if forget:
                del self._held[key]
            return mine

    def _release_unheld(self, key: str, holder: str) -> None:
        """`release_lock` of a lock that ``holder`` does not hold in this process.

        Nothing happens if the lock is free; `ValueError` if another holder
        holds it.
        """
        if self.is_locked(key):
            msg = (
                f"{type(self).__name__} cannot release the lock of key {key!r} "
                f"for holder {holder!r}: it is {self._describe(key)}."
            )
            raise ValueError(msg)

    def _deadline(self, timeout: float | None) -> float:
        wait = self.max_wait if timeout is None else max(0.0, timeout)
        return time.monotonic() + wait

    def _sleep_until(self, deadline: float) -> bool:
        """Sleep one poll interval (less near the deadline); False once past it."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self.poll_interval, left))
        return True

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take the lock of ``key`` for ``holder``, waiting while it is held.

        Parameters
        ----------
        key : str
            The locked record (a task's cache key).
        holder : str
            Who takes it; the same holder taking it again gets ``True``.
        acquire_timeout : float or None, default=None
            Seconds to wait for a live holder; 0 tries once. None waits at
            most ``max_wait`` seconds, then raises `LockTimeoutError`.
        hold_timeout : float or None, default=None
            Seconds after which the lock counts as released even if its holder
            lives on. None holds it until released or until the holder dies.

        Returns
        -------
        acquired : bool
            False if ``acquire_timeout`` passed first.

        Raises
        ------
        LockTimeoutError
            ``acquire_timeout`` is None and ``max_wait`` passed.
        """
        if hold_timeout is not None:
            hold_timeout = check_seconds(
                type(self).__name__, "hold_timeout", hold_timeout, zero=True
            )
        deadline = self._deadline(acquire_timeout)
        while True:
            if self._try_acquire(key, holder, hold_timeout):
                return True
            if not self._sleep_until(deadline):
                break
        if acquire_timeout is not None:
            return False
        msg = (
            f"{type(self).__name__} waited max_wait={self.max_wait:g} s for the "
            f"lock of key {key!r}, {self._describe(key)}, and gave up. Raise "
            "max_wait if batches take longer, or find out why its holder is "
            "stuck."
        )
        raise LockTimeoutError(msg)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """`acquire_lock` in a worker thread, for async callers."""
        return await asyncio.to_thread(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until ``key`` is not locked, at most ``timeout`` seconds.

        Parameters
        ----------
        key : str
            The locked record.
        timeout : float or None, default=None
            None waits at most ``max_wait`` seconds.

        Returns
        -------
        free : bool
            True if the lock was free (or released) before the timeout.
        """
        deadline = self._deadline(timeout)
        while self.is_locked(key):
            if not self._sleep_until(deadline):
                return False
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """`wait_for_lock` in a worker thread, for async callers."""
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)
