"""Files on a local filesystem: atomic writes, temporary files, file stamps.

A *stamp* (size, ``mtime_ns``, inode, ``ctime_ns``) tells cheaply whether a
file is still the one that was validated: ``os.replace`` gives the new file a
new inode, and no user call can set ``ctime``, so a file swapped for another
one of the same size and modification time is noticed. Other filesystems
(fsspec URLs) are in `samplepipe.storage.fs`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from ..errors import MissingStoreError as MissingStoreError

TMP_SUFFIX = ".tmp"
# The host in temporary names is a short digest: a long or dotted hostname
# neither overflows the 255-byte name limit nor confuses the parser.
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
MAX_EXTENSION = 20  # bytes; with 200-byte key components, names stay <= 255 bytes

# OSErrors that retrying cannot fix: reported at once.
PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.EDQUOT,
        errno.EEXIST,
    }
)


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying cannot fix ``exc`` (anything but a transient `OSError`)."""
    if not isinstance(exc, OSError) or isinstance(exc, MissingStoreError):
        return True
    return exc.errno in PERMANENT_ERRNOS


class Stamp(NamedTuple):
    """What identifies one version of a file on disk."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def stamp(path: str) -> Stamp | None:
    """The `Stamp` of ``path``, or None if it does not exist."""
    try:
        return Stamp.of(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------
def temporary_name(path: str) -> str:
    folder, name = os.path.split(path)
    tag = f"{HOST_TAG}-{os.getpid()}-{os.urandom(4).hex()}"
    return os.path.join(folder, f".{name}.{tag}{TMP_SUFFIX}")


def atomic_write(
    path: str, write: Callable[[str], None], *, fsync: bool = False
) -> None:
    """Write a file through ``write(tmp_path)`` and move it into place.

    The temporary file lives in the same folder, so ``os.replace`` is atomic: a
    reader sees the old file or the new one, never half of one. The temporary
    file is removed on any failure.
    """
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# open(name, "wb") without Python's buffered file object (~10 us a file)
_CREATE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_TRUNC
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def write_bytes(path: str, blob: bytes, *, fsync: bool = False) -> None:
    """Write ``blob`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        fd = os.open(tmp, _CREATE, 0o666)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    atomic_write(path, write, fsync=fsync)


def is_temporary_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _temporary_owner(name: str) -> tuple[str, int] | None:
    """``(host tag, pid)`` from a temporary file name, or None."""
    tail = name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
    parts = tail.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _owner_alive(name: str) -> bool:
    """Whether the process that owns a temporary file may still be writing it."""
    owner = _temporary_owner(name)
    if owner is None:
        return False
    host, pid = owner
    if host != HOST_TAG:
        return True  # another machine: leave it to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder: str, max_age: float = 3600.0) -> list[str]:
    """Remove temporary files left in ``folder`` by crashed writers.

    A temporary file is removed when its writer process no longer exists on this
    host, or it is older than ``max_age`` seconds. Returns the removed paths.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    mine = f".{HOST_TAG}-{os.getpid()}-"
    for entry in entries:
        if not is_temporary_file(entry.name) or mine in entry.name:
            continue  # our own writer threads may be using ours right now
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > max_age
        except FileNotFoundError:
            continue
        if old or not _owner_alive(entry.name):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


# ---------------------------------------------------------------------------
# files this process validated
# ---------------------------------------------------------------------------
class ValidatedFiles:
    """A bounded LRU of ``path -> (stamp, record)`` for validated files.

    A hit costs one ``os.stat``: any change of the file (another writer, a
    deletion, a swap) changes its stamp and sends it back to full validation.
    """

    def __init__(self, maxsize: int = 200_000) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[str, tuple[Stamp, str]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, path: str, st: Stamp, record: str) -> None:
        with self._lock:
            self._items[path] = (st, record)
            self._items.move_to_end(path)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def get(self, path: str) -> tuple[Stamp, str] | None:
        with self._lock:
            item = self._items.get(path)
            if item is not None:
                self._items.move_to_end(path)
            return item

    def forget(self, path: str) -> None:
        with self._lock:
            self._items.pop(path, None)

    def clear(self) -> None:
        """Forget every file (as a new process would)."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


VALIDATED = ValidatedFiles()
