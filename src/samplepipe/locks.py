"""Lock managers for the flows' per-batch locks: files on one host, Redis across hosts.

A flow takes one lock per task cache key (Prefect's ``SERIALIZABLE`` isolation),
so that two flow runs never compute the same batch at once. Both managers here
implement Prefect's ``prefect.locking.protocol.LockManager``:

`CrashSafeFileLocks` (the default)
    One lock file per key in a private folder of this host. The holder keeps
    an exclusive ``fcntl.flock`` on its lock file; the kernel drops it when
    the holder dies (even ``kill -9``), so a dead holder's lock is free at
    once, and a waiter sees it within ``poll_interval`` (0.1 s). Neither a
    reused PID (a restarted container: same hostname, PID 1 again) nor a clock
    that steps back can keep it: neither the PID nor the clock is consulted.
    The folder must be owned by the current user with mode ``0o700``. One of
    this user that others can read but not write (older versions made it
    ``0o755``) is made private; a folder of another user, one that others can
    write, and a lock file that is not a regular file are refused with
    `UnsafeLockFolderError` (a planted symbolic link is never followed).
    New lock files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``
    under ``.<name>.tmp`` and linked into place with ``link(2)``, which
    never follows or replaces what is already there.
`RedisLocks`
    One Redis key per lock, set with ``SET NX PX`` and a lease of
    ``lease_seconds`` (30 s by default), renewed every ``lease_seconds / 3``
    by a thread of the holding process. A holder that dies, or loses its
    connection, stops renewing: its lock is free at most ``lease_seconds``
    after that, and waiters see it within ``poll_interval`` more. A holder
    that stops renewing while alive (frozen for a whole lease) loses its lock,
    and a warning is logged; checkpoint writes are atomic, so the cost is
    duplicated work, never a torn file.

Every wait ends. ``acquire_lock`` without ``acquire_timeout`` (how Prefect's
transactions call it) waits at most ``max_wait`` seconds (1 hour by default)
for a live holder, then raises `LockTimeoutError`; ``wait_for_lock`` without
a timeout returns ``False`` after ``max_wait``. Redis calls time out after 10 s.

Configuration: `lock_manager_from_url` reads the environment variable
``SAMPLEPIPE_LOCKS`` when given no URL: unset or empty for file locks in
`default_lock_dir`, ``file:///absolute/folder`` for file locks elsewhere, and
``redis://host:port/db`` (or ``rediss://`` for TLS, ``unix:///path?db=N``)
for Redis locks, with an optional ``lease_seconds=S`` query parameter. Every
process that may compute the same batches must use the same setting.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> from samplepipe.locks import CrashSafeFileLocks, lock_manager_from_url
>>> locks = CrashSafeFileLocks(Path(tempfile.mkdtemp()) / "locks")
>>> locks.acquire_lock("batch-1", holder="run-a")
True
>>> locks.acquire_lock("batch-1", holder="run-b", acquire_timeout=0)
False
>>> locks.release_lock("batch-1", holder="run-a")
>>> locks.is_locked("batch-1")
False
>>> import shutil
>>> shutil.rmtree(locks.lock_files_directory.parent)
>>> lock_manager_from_url("redis://redis.example:6379/0?lease_seconds=20")
RedisLocks('redis://redis.example:6379/0', lease_seconds=20.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import stat
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis

__all__ = [
    "ENV_VAR",
    "CrashSafeFileLocks",
    "LockTimeoutError",
    "RedisLocks",
    "UnsafeLockFolderError",
    "default_lock_dir",
    "lock_manager_from_url",
]

logger = logging.getLogger(__name__)

ENV_VAR = "SAMPLEPIPE_LOCKS"
"""The environment variable `lock_manager_from_url` reads when given no URL."""

# How long one takes the lock folder's guard, a critical section of a few
# system calls; a holder that dies inside it releases it with its descriptors.
GUARD_TIMEOUT = 10.0
# Redis socket timeouts (seconds) unless the URL sets its own.
REDIS_TIMEOUT = 10.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a lock path must not block.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\Z")


class LockTimeoutError(TimeoutError):
    """A lock stayed held by a live holder for longer than ``max_wait``."""


class UnsafeLockFolderError(ValueError):
    """The lock folder, or a file in it, could be controlled by someone else."""


def default_lock_dir() -> Path:
    """The default folder of file locks: ``<tempdir>/samplepipe-locks-<uid>``.

    Returns
    -------
    path : pathlib.Path
        A folder of this user in the temporary folder (``TMPDIR``); it is
        created with mode ``0o700`` on first use, and refused if someone else
        created it first.
    """
    return Path(tempfile.gettempdir()) / f"samplepipe-locks-{os.getuid()}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT_ID = _boot_id()
# Managers whose per-process state a forked child must drop (see _after_fork).
_INSTANCES: weakref.WeakSet[_PollingLocks[Any]] = weakref.WeakSet()


def _after_fork() -> None:
    for manager in list(_INSTANCES):
        manager._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork)


def _check_seconds(owner: str, name: str, value: object, *, zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{owner} got {name}={value!r}; expected a number of seconds."
        raise TypeError(msg)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        msg = f"{owner} got {name}={value!r}; expected a finite number {bound}."
        raise ValueError(msg)
    return float(value)


class _Holding(Protocol):
    """What a manager keeps of a lock this process holds."""

    @property
    def holder(self) -> str: ...


_H = TypeVar("_H", bound=_Holding)


class _PollingLocks(Generic[_H]):
    """Bounded waits and async variants shared by samplepipe's lock managers.

    Subclasses implement ``_try_acquire`` (one attempt, never waits),
    ``is_locked``, ``is_lock_holder``, ``release_lock`` and ``_describe``; they
    keep the locks this process holds in ``_held`` (key -> record), guarded
    by ``_mutex``.
    """

    def __init__(self, *, max_wait: float, poll_interval: float) -> None:
        name = type(self).__name__
        self.max_wait = _check_seconds(name, "max_wait", max_wait, zero=False)
        self.poll_interval = _check_seconds(
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
            hold_timeout = _check_seconds(
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


@dataclass(frozen=True)
class _Held:
    holder: str
    fd: int  # open, with an exclusive flock, until released
    ident: tuple[int, int]  # (st_dev, st_ino) of the lock file


@dataclass(frozen=True)
class _Seen:
    record: dict[str, Any]
    alive: bool  # its holder still holds the flock
    expired: bool  # its hold timeout passed
    ident: tuple[int, int]


class CrashSafeFileLocks(_PollingLocks[_Held]):
    """File locks of this host that die with their holder (kernel ``flock``).

    A lock is the file ``<lock_files_directory>/<key>.lock``, on which its
    holder keeps an exclusive ``fcntl.flock`` until it releases it. The kernel
    drops the flock when the holding process dies, so a lock whose holder
    died counts as released at once, whatever its PID has become since and
    whatever the clock says. The file records the holder, host and PID for
    people reading it; nothing trusts them. A child forked by the holder does
    not keep its locks alive.

    Parameters
    ----------
    lock_files_directory : path-like
        A folder of this host (not a network filesystem: use `RedisLocks`
        across hosts). Created with mode ``0o700`` if missing; it must be
        owned by the current user, and nobody else may write in it (a mode
        such as ``0o755`` is changed to ``0o700``).
    max_wait : float, default=3600.0
        Most seconds ``acquire_lock`` and ``wait_for_lock`` wait when called
        without a timeout.
    poll_interval : float, default=0.1
        Seconds between two looks at a held lock.

    Attributes
    ----------
    lock_files_directory : pathlib.Path
        The folder, as an absolute path (symbolic links in it not resolved).

    Raises
    ------
    UnsafeLockFolderError
        On first use, if the folder is not a directory owned by the current
        user, if others can write in it, or if a lock file is not a regular
        file.

    See Also
    --------
    RedisLocks : Locks shared by several hosts.
    lock_manager_from_url : Pick a lock manager from a URL or ``SAMPLEPIPE_LOCKS``.

    Notes
    -----
    Every change of the folder (creating, taking over or removing a lock file)
    happens under a ``flock`` on the folder itself, held for a few system
    calls; a lock file appears only once complete and flocked.
    """

    def __init__(
        self,
        lock_files_directory: str | os.PathLike[str],
        *,
        max_wait: float = 3600.0,
        poll_interval: float = 0.1,
    ) -> None:
        folder = os.path.expanduser(os.fspath(lock_files_directory))
        self.lock_files_directory = Path(os.path.abspath(folder))
        super().__init__(max_wait=max_wait, poll_interval=poll_interval)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.lock_files_directory)!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Held locks belong to this process: a copy elsewhere holds none.
        return {
            "lock_files_directory": self.lock_files_directory,
            "max_wait": self.max_wait,
            "poll_interval": self.poll_interval,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["lock_files_directory"],
            max_wait=state["max_wait"],
            poll_interval=state["poll_interval"],
        )

    def _forget_after_fork(self) -> None:
        # The child shares the parent's open file descriptions: closing its
        # copies lets the locks die with the parent, not with the child.
        for held in self._held.values():
            with contextlib.suppress(OSError):
                os.close(held.fd)
        super()._forget_after_fork()

    def lock_path(self, key: str) -> Path:
        """The lock file of ``key``.

        Keys made of letters, digits, ``_``, ``-`` and ``.`` (128 at most, not
        starting with ``.``) are used as they are, others are hashed. A new
        lock file is first written as ``.<name>.tmp`` in the same folder.
        """
        name = key if _SAFE_KEY.match(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.lock_files_directory / f"{name}.lock"

    # -- the folder --------------------------------------------------------

    def _refuse(self, path: Path | str, problem: str, fix: str) -> NoReturn:
        msg = (
            f"{type(self).__name__} refuses the lock folder "
            f"'{self.lock_files_directory}': {path} {problem}. A lock folder must "
            f"be a directory owned by this user (uid {os.getuid()}) with mode "
            f"0o700, holding only regular lock files. {fix}"
        )
        raise UnsafeLockFolderError(msg)

    def _open_folder(self) -> int:
        """A descriptor of the checked folder; all paths are relative to it."""
        path = self.lock_files_directory
        created = False
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
                created = True
        other = (
            f"Choose another folder, e.g. {ENV_VAR}=file:///a/private/folder "
            "(see samplepipe.locks)."
        )
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            self._refuse(path, "is not a directory (a symbolic link or a file)", other)
        try:
            if created:  # whatever the umask
                os.fchmod(fd, 0o700)
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                self._refuse(
                    path,
                    f"is owned by uid {st.st_uid}",
                    f"Ask its owner (or root) to remove it. {other}",
                )
            mode = stat.S_IMODE(st.st_mode)
            if mode != 0o700 and not mode & 0o022:
                # Nobody else could write in it (older samplepipe versions made
                # it 0o755): making it private loses nothing.
                os.fchmod(fd, 0o700)
                logger.info("Made the lock folder %s private (mode 0o700).", path)
                mode = 0o700
            if mode != 0o700:
                self._refuse(
                    path,
                    f"has mode {mode:#o}: other users can write in it",
                    "If you trust its lock files, run: chmod 700 "
                    f"'{path}'; else remove it.",
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[int]:
        """The folder's descriptor, with an exclusive flock on it."""
        dfd = self._open_folder()
        try:
            deadline = time.monotonic() + GUARD_TIMEOUT
            while True:
                try:
                    fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        msg = (
                            f"{type(self).__name__} could not lock the folder "
                            f"'{self.lock_files_directory}' for {GUARD_TIMEOUT:g} s; "
                            "a process holding it is stopped (check for stopped "
                            "processes of this user)."
                        )
                        raise LockTimeoutError(msg) from None
                    time.sleep(0.002)
            yield dfd
        finally:
            os.close(dfd)  # drops the flock

    # -- lock files --------------------------------------------------------

    def _holder_is_alive(self, fd: int, record: dict[str, Any]) -> bool:
        """Whether the lock file open at ``fd`` is still flocked by its holder.

        Probing takes a *shared* flock, so two probes never disturb each other.
        ``record`` (what the file says) is not trusted.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def _inspect(self, dfd: int, name: str) -> _Seen | None:
        """What the lock file ``name`` holds; None if there is none."""
        path = self.lock_files_directory / name
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            self._refuse(
                path,
                "is a symbolic link (not followed)",
                f"Remove the link: rm '{path}'.",
            )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._refuse(
                    path, "is not a regular file", f"Remove it: rm -r '{path}'."
                )
            try:
                record = json.loads(os.read(fd, 65536) or b"{}")
            except ValueError:  # written by something else: only flock counts
                record = {}
            if not isinstance(record, dict):
                record = {}
            alive = self._holder_is_alive(fd, record)
        finally:
            os.close(fd)
        expires = record.get("expires")
        expired = (
            isinstance(expires, int | float)
            and record.get("boot_id") == _BOOT_ID
            and time.monotonic() >= expires
        )
        return _Seen(record, alive, expired, (st.st_dev, st.st_ino))

    def _look(self, key: str) -> _Seen | None:
        dfd = self._open_folder()
        try:
            return self._inspect(dfd, self.lock_path(key).name)
        finally:
            os.close(dfd)

    def _describe(self, key: str) -> str:
        seen = self._look(key)
        if seen is None or not seen.alive:
            return "now free"
        r = seen.record
        return (
            f"held by holder {r.get('holder')!r} (pid {r.get('pid')} on host "
            f"{r.get('host')!r}, lock file '{self.lock_path(key)}')"
        )

    def _try_acquire(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        name = self.lock_path(key).name
        with self._guarded() as dfd:
            seen = self._inspect(dfd, name)
            with self._mutex:
                mine = self._held.get(key)
            if mine is not None:
                if seen is not None and seen.ident == mine.ident and not seen.expired:
                    return mine.holder == holder
                self._forget(key)  # it expired and was taken over, or removed
            if seen is not None:
                if seen.alive and not seen.expired:
                    return False
                os.unlink(name, dir_fd=dfd)
                logger.info(
                    "Took over the lock of key %r from %r (pid %s on %r): %s.",
                    key,
                    seen.record.get("holder"),
                    seen.record.get("pid"),
                    seen.record.get("host"),
                    "its hold timeout passed" if seen.alive else "its holder died",
                )
            self._create(dfd, key, name, holder, hold_timeout)
        return True

    def _create(
        self, dfd: int, key: str, name: str, holder: str, hold: float | None
    ) -> None:
        tmp = f".{name}.tmp"
        # Only a holder killed in the middle of this leaves it; never followed.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        fd = os.open(tmp, _NEW_FLAGS, 0o600, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o600)  # readable by this user whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            record = {
                "holder": holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "boot_id": _BOOT_ID,
                "acquired": time.time(),
                "expires": None if hold is None else time.monotonic() + hold,
            }
            data = json.dumps(record).encode()
            while data:
                data = data[os.write(fd, data) :]
            os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            os.unlink(tmp, dir_fd=dfd)
            st = os.fstat(fd)
            with self._mutex:
                self._held[key] = _Held(holder, fd, (st.st_dev, st.st_ino))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise

    def _forget(self, key: str) -> _Held | None:
        with self._mutex:
            held = self._held.pop(key, None)
        if held is not None:
            os.close(held.fd)
        return held

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock of ``key`` taken by ``holder``.

        Releasing a lock that nobody holds (any more) does nothing.

        Raises
        ------
        ValueError
            The lock is held by another holder.
        """
        mine = self._held_by(key, holder)
        if mine is None:
            self._release_unheld(key, holder)
            return
        name = self.lock_path(key).name
        try:
            with self._guarded() as dfd:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if (st.st_dev, st.st_ino) == mine.ident:
                    os.unlink(name, dir_fd=dfd)
        finally:
            self._forget(key)  # closing drops the flock in any case

    def is_locked(self, key: str) -> bool:
        """Whether a live holder holds the lock of ``key``."""
        seen = self._look(key)
        return seen is not None and seen.alive and not seen.expired

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Whether ``holder``, in this process, holds the lock of ``key``."""
        mine = self._held_by(key, holder)
        if mine is None:
            return False
        seen = self._look(key)
        return seen is not None and seen.ident == mine.ident and not seen.expired


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


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisLocks(_PollingLocks[_Lease]):
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
        self.lease_seconds = _check_seconds(
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
                f"{name} got url={_redacted(url)!r}: {exc}. Expected "
                "redis://host:port/db, rediss://host:port/db or "
                "unix:///path/to/socket?db=N."
            )
            raise ValueError(msg) from exc
        self._renewer: threading.Thread | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({_redacted(self.url)!r}, "
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
                f"{_redacted(self.url)!r}: {exc}. Check that the server runs and "
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
                        _redacted(self.url),
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
                        _redacted(self.url),
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
                _redacted(self.url),
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


_FORMS = (
    "None or '' (file locks in the default folder), 'file:///absolute/folder' "
    "(file locks there), or 'redis://host:port/db' (also rediss:// and "
    "unix:///path/to/socket?db=N; optional '?lease_seconds=S') for Redis locks "
    "shared by several hosts"
)


def lock_manager_from_url(url: str | None = None) -> CrashSafeFileLocks | RedisLocks:
    """The lock manager that ``url`` (or ``SAMPLEPIPE_LOCKS``) names.

    Parameters
    ----------
    url : str or None, default=None
        None reads the environment variable ``SAMPLEPIPE_LOCKS``. Then:
        None or ``""``: `CrashSafeFileLocks` in `default_lock_dir`;
        ``file:///absolute/folder``: `CrashSafeFileLocks` in that folder;
        ``redis://host:port/db``, ``rediss://...`` or
        ``unix:///path/to/socket?db=N``: `RedisLocks`, with the query
        parameter ``lease_seconds`` (default 30) taken out as its lease.

    Returns
    -------
    manager : CrashSafeFileLocks or RedisLocks
        Created without touching the folder or contacting the server.

    Raises
    ------
    TypeError
        ``url`` is not a string.
    ValueError
        Any other form of URL, or a bad ``lease_seconds``.

    Examples
    --------
    >>> from samplepipe.locks import lock_manager_from_url
    >>> lock_manager_from_url("file:///var/lib/samplepipe/locks")
    CrashSafeFileLocks('/var/lib/samplepipe/locks')
    >>> lock_manager_from_url("redis://10.0.0.5:6379/2")
    RedisLocks('redis://10.0.0.5:6379/2', lease_seconds=30.0)
    >>> lock_manager_from_url("http://example.org")
    Traceback (most recent call last):
    ...
    ValueError: lock_manager_from_url got url='http://example.org'; expected ...
    """
    where = "url"
    if url is None:
        url = os.environ.get(ENV_VAR)
        where = f"{ENV_VAR} (from the environment)"
    if not url:
        return CrashSafeFileLocks(default_lock_dir())
    if not isinstance(url, str):
        msg = f"lock_manager_from_url got url={url!r}; expected a string or None."
        raise TypeError(msg)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file" and parts.netloc in ("", "localhost"):
        folder = unquote(parts.path)
        if os.path.isabs(folder) and not parts.query:
            return CrashSafeFileLocks(folder)
    elif scheme in ("redis", "rediss", "unix"):
        query = parse_qsl(parts.query, keep_blank_values=True)
        leases = [v for k, v in query if k == "lease_seconds"]
        # Rebuilt by hand: urlunsplit drops the empty host of unix:///path.
        others = urlencode([(k, v) for k, v in query if k != "lease_seconds"])
        rest = url.partition("?")[0] + (f"?{others}" if others else "")
        if not leases:
            return RedisLocks(rest)
        try:
            lease = float(leases[-1])
        except ValueError:
            lease = math.nan
        if math.isfinite(lease) and lease > 0:
            return RedisLocks(rest, lease_seconds=lease)
        msg = (
            f"lock_manager_from_url got {where}={_redacted(url)!r} with "
            f"lease_seconds={leases[-1]!r}; expected a number of seconds > 0."
        )
        raise ValueError(msg)
    msg = f"lock_manager_from_url got {where}={_redacted(url)!r}; expected {_FORMS}."
    raise ValueError(msg)
