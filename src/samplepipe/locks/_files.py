"""File locks of one host that die with their holder: `CrashSafeFileLocks`."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..errors import LockTimeoutError, UnsafeLockFolderError
from ._base import ENV_VAR, PollingLocks, logger

# How long one takes the lock folder's guard, a critical section of a few
# system calls; a holder that dies inside it releases it with its descriptors.
GUARD_TIMEOUT = 10.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a lock path must not block.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\Z")


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


class CrashSafeFileLocks(PollingLocks[_Held]):
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
