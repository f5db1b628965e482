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

The package keeps one backend per module, on a small shared base: ``_base``
(`PollingLocks`: bounded waits, async variants, fork safety), ``_files``
(`CrashSafeFileLocks`), ``_redis`` (`RedisLocks`) and ``_url``
(`lock_manager_from_url`). Import the public names from ``samplepipe.locks``;
exceptions are defined in `samplepipe.errors`. Any object implementing
Prefect's ``LockManager`` protocol may be given to the flows (``locks=``).

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

from ..errors import LockTimeoutError, UnsafeLockFolderError
from ._base import ENV_VAR
from ._base import logger as logger
from ._files import GUARD_TIMEOUT as GUARD_TIMEOUT
from ._files import CrashSafeFileLocks, default_lock_dir
from ._redis import REDIS_TIMEOUT as REDIS_TIMEOUT
from ._redis import RedisLocks
from ._url import lock_manager_from_url

__all__ = [
    "ENV_VAR",
    "CrashSafeFileLocks",
    "LockTimeoutError",
    "RedisLocks",
    "UnsafeLockFolderError",
    "default_lock_dir",
    "lock_manager_from_url",
]
