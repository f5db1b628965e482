"""Validated checkpoint files, recorded across processes: a file trusted from one stat.

A process that writes a default-format checkpoint, or validates one by reading
it (record and payload checksum), appends a line to the *journal* of the file's
folder: the file's name, its `Stamp` (size, ``mtime_ns``, inode, ``ctime_ns``)
and its verified record. Another process then trusts the file when its stamp is
the one in the journal: one ``os.stat`` instead of opening and reading it.

Where: one journal per checkpoint folder, in a private folder of this user on
this host (``$SAMPLEPIPE_JOURNAL``; by default ``<tmp>/samplepipe-journal-<uid>``,
``off`` turns journals off), named after the host and the device and inode of
the checkpoint folder. Never inside ``features_dir``, whose listing holds only
checkpoints. Losing a journal (a reboot that empties ``/tmp``) costs speed only:
each file is then validated by reading it once more.

What makes a line trustworthy:

* The stamp. ``os.replace`` gives the new file a new inode, and any write gives
  it a new change time, which no user call can set: a replaced, truncated or
  rewritten file does not match its line.
* Only filesystems whose stamps are strong: journals are used for folders on
  local filesystems (ext4, xfs, btrfs, tmpfs, overlay, zfs, ...), never on
  network or FUSE filesystems, and lines of another host are never read.
* Each line carries a digest of itself: a torn, partial or edited line is
  ignored. A journal folder or file that is not this user's, or that others can
  write, is not used.
* A line only ever makes a file *valid*. Every other verdict, and so every
  decision to overwrite or remove a file, comes from reading the file.
* A loader verifies the payload checksum as it reads: a file that fails it is
  revoked here (a line without a record), and never trusted again at that stamp.

Journals of folders that no longer exist, or unused for 30 days, are removed
(checked at most once a day). A journal with many superseded lines is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .files import HOST_TAG, Stamp

ENV = "SAMPLEPIPE_JOURNAL"
OFF = "off"
SUFFIX = ".journal"
HEADER = "samplepipe-journal"
VERSION = 1
MAX_AGE = 30 * 86400.0  # seconds a journal may go unused before it is removed
GC_EVERY = 86400.0  # seconds between two garbage collections
# Filesystems whose inode numbers and change times identify a version of a
# file (see `samplepipe.storage.files.Stamp`). Network filesystems (NFS, SMB),
# FUSE and anything unknown are left out: their stamps may be cached or made up.
STRONG_FILESYSTEMS = frozenset(
    {
        "bcachefs",
        "btrfs",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "jfs",
        "overlay",
        "reiserfs",
        "tmpfs",
        "xfs",
        "zfs",
    }
)
_CHUNK = 1 << 20  # bytes per write of appended lines

Entry = tuple[Stamp, str | None]  # record None: revoked at that stamp


def default_folder() -> str:
    """Where journals live unless ``$SAMPLEPIPE_JOURNAL`` says otherwise."""
    return os.path.join(tempfile.gettempdir(), f"samplepipe-journal-{os.getuid()}")


def _digest(body: bytes) -> bytes:
    """CRC-32 of a line's body: catches torn, mixed and bit-flipped lines.

    (Not a defence against someone who can write the journal: its folder is
    private, and such a person could write checkpoints as well.)
    """
    return b"%08x" % zlib.crc32(body)


def encode_line(name: str, st: Stamp, record: str | None) -> bytes:
    """One journal line: ``<digest> <json>\\n``."""
    body = json.dumps([name, *st, record], ensure_ascii=True).encode()
    return _digest(body) + b" " + body + b"\n"


def decode_lines(lines: Iterable[bytes]) -> list[tuple[str, Stamp, str | None]]:
    """``(name, stamp, record)`` of each good line; headers and bad lines left out."""
    bodies = []
    for line in lines:
        digest, _, body = line.partition(b" ")
        if body and _digest(body) == digest:
            bodies.append(body)
    try:  # one parse for all lines: a journal of 10,000 lines in milliseconds
        items = json.loads(b"[" + b",".join(bodies) + b"]")
    except ValueError:
        items = [_loads(body) for body in bodies]
    return [entry for entry in map(_entry, items) if entry is not None]


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _entry(item: Any) -> tuple[str, Stamp, str | None] | None:
    if type(item) is not list or len(item) != 6:
        return None
    name, size, mtime_ns, ino, ctime_ns, record = item
    if type(name) is not str or not (record is None or type(record) is str):
        return None
    if not (type(size) is type(mtime_ns) is type(ino) is type(ctime_ns) is int):
        return None
    return name, Stamp(size, mtime_ns, ino, ctime_ns), record


def _header(folder: str) -> bytes:
    body = json.dumps([HEADER, VERSION, folder]).encode()
    return _digest(body) + b" " + body + b"\n"


def _header_folder(line: bytes) -> str | None:
    digest, _, body = line.partition(b" ")
    if not body or _digest(body) != digest:
        return None
    try:
        item = json.loads(body)
    except ValueError:
        return None
    if isinstance(item, list) and len(item) == 3 and item[0] == HEADER:
        return item[2] if isinstance(item[2], str) else None
    return None


def _private(st: os.stat_result) -> bool:
    """Owned by this user, and nobody else may write it."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _filesystem_types() -> dict[int, str]:
    """``{device: filesystem type}`` of this process's mounts (Linux)."""
    types: dict[int, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 3 or not rest:
                    continue
                major, _, minor = parts[2].partition(":")
                if major.isdigit() and minor.isdigit():
                    types[os.makedev(int(major), int(minor))] = rest.split()[0]
    except OSError:
        pass
    return types


class _View:
    """What this process knows of one folder's journal."""

    __slots__ = (
        "dev",
        "entries",
        "file_ino",
        "folder",
        "ino",
        "lines",
        "offset",
        "path",
    )

    def __init__(self, path: str, folder: str, dev: int, ino: int) -> None:
        self.path = path  # the journal file
        self.folder = folder  # the checkpoint folder (absolute), its device and inode
        self.dev = dev
        self.ino = ino
        self.file_ino = -1  # inode of the journal file read so far
        self.offset = 0  # bytes of it read so far
        self.lines = 0  # lines read so far (superseded ones included)
        self.entries: dict[str, Entry] = {}

    def apply(self, name: str, st: Stamp, record: str | None) -> None:
        old = self.entries.get(name)
        if record is not None and old is not None and old == (st, None):
            return  # revoked at this stamp: stays revoked
        self.entries[name] = (st, record)
        self.lines += 1


class Journals:
    """The journals of this process: lookups, appends, revocations.

    One process-wide instance, `JOURNAL`. Every method is safe to call from
    several threads and never raises for a journal it cannot read or write
    (journals only save time).
    """

    def __init__(self, maxsize: int = 200_000) -> None:
        self.maxsize = maxsize  # entries kept in memory, over all folders
        self._lock = threading.Lock()
        self._views: OrderedDict[str, _View | None] = OrderedDict()
        self._size = 0
        self._root_setting: str | None = None
        self._root: str | None = None
        self._fs_types: dict[int, str] | None = None
        self._strong: dict[int, bool] = {}
        self._collected = False

    # -- the public calls --------------------------------------------------
    def lookup(self, path: str, st: Stamp) -> str | None:
        """The record the journal holds for ``path`` at stamp ``st``, or None."""
        folder, name = os.path.split(path)
        with self._lock:
            view = self._view(folder)
            if view is None:
                return None
            entry = view.entries.get(name)
            if entry is None or entry[0] != st:
                # another process may have appended since: read on, once
                view = self._refresh(folder)
                entry = view.entries.get(name) if view is not None else None
            if entry is None or entry[0] != st:
                return None
            return entry[1]

    def add(self, items: Iterable[tuple[str, Stamp, str | None]]) -> None:
        """Append ``(path, stamp, record)`` lines; a record None revokes the stamp."""
        by_folder: dict[str, list[tuple[str, Stamp, str | None]]] = {}
        for path, st, record in items:
            folder, name = os.path.split(path)
            by_folder.setdefault(folder, []).append((name, st, record))
        if not by_folder:
            return
        with self._lock:
            for folder, entries in by_folder.items():
                view = self._refresh(folder)  # the folder now, not a removed one
                if view is not None:
                    self._append(view, entries)
            if not self._collected and self._root is not None:
                self._collected = True
                self._collect_garbage(self._root)

    def revoke(self, path: str, st: Stamp) -> None:
        """Never trust ``path`` at stamp ``st`` again (it failed its checksum)."""
        self.add([(path, st, None)])

    def file_of(self, folder: str) -> str | None:
        """The journal file of checkpoint folder ``folder`` (None: no journal)."""
        with self._lock:
            view = self._refresh(folder)
            return None if view is None else view.path

    def clear(self) -> None:
        """Forget what this process read (journals on disk stay)."""
        with self._lock:
            self._views.clear()
            self._size = 0
            self._strong.clear()
            self._fs_types = None

    def __len__(self) -> int:
        return self._size

    # -- where journals live -----------------------------------------------
    def root(self) -> str | None:
        """The journal folder, made private if needed; None when journals are off."""
        setting = os.environ.get(ENV, "")
        if setting != self._root_setting:
            self._root_setting = setting
            self._root = self._make_root(setting)
            self._views.clear()
            self._size = 0
            self._collected = False
        return self._root

    @staticmethod
    def _make_root(setting: str) -> str | None:
        if setting.strip().lower() == OFF:
            return None
        folder = os.path.abspath(os.path.expanduser(setting or default_folder()))
        try:
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return None  # a link, a file, or another user's: not used
            if st.st_mode & 0o077:
                os.chmod(folder, 0o700)
        except OSError:
            return None
        return folder

    def _strong_fs(self, dev: int) -> bool:
        strong = self._strong.get(dev)
        if strong is None:
            if self._fs_types is None or dev not in self._fs_types:
                self._fs_types = _filesystem_types()  # mounts may have changed
            strong = self._fs_types.get(dev) in STRONG_FILESYSTEMS
            self._strong[dev] = strong
        return strong

    def _view(self, folder: str) -> _View | None:
        """The view of ``folder``'s journal (read on first use), or None."""
        root = self.root()
        if root is None:
            return None
        try:
            view = self._views[folder]
        except KeyError:
            return self._refresh(folder)
        self._views.move_to_end(folder)
        return view

    def _refresh(self, folder: str) -> _View | None:
        """Check which folder ``folder`` is now and read its journal's new lines."""
        root = self.root()
        if root is None:
            return None
        old = self._views.pop(folder, None)
        if old is not None:
            self._size -= len(old.entries)
        try:
            st = os.stat(folder or ".")
        except OSError:
            return None  # not cached: the folder may be made later
        view: _View | None = None
        if stat.S_ISDIR(st.st_mode) and self._strong_fs(st.st_dev):
            if old is not None and (old.dev, old.ino) == (st.st_dev, st.st_ino):
                view = old
            else:
                name = f"{HOST_TAG}-{st.st_dev:x}-{st.st_ino:x}{SUFFIX}"
                path = os.path.join(root, name)
                view = _View(path, os.path.abspath(folder or "."), st.st_dev, st.st_ino)
            self._read(view)
            self._size += len(view.entries)
        self._views[folder] = view
        while self._size > self.maxsize and len(self._views) > 1:
            _, evicted = self._views.popitem(last=False)
            if evicted is not None:
                self._size -= len(evicted.entries)
        return view

    # -- reading and writing journal files ---------------------------------
    @staticmethod
    def _open(path: str, flags: int) -> int | None:
        """A file descriptor of a private regular journal file, or None."""
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode) or not _private(st):
            os.close(fd)
            return None
        return fd

    def _read(self, view: _View) -> None:
        """Read the lines of ``view``'s journal that it has not read yet."""
        fd = self._open(view.path, os.O_RDONLY)
        if fd is None:
            view.entries.clear()
            view.file_ino, view.offset, view.lines = -1, 0, 0
            return
        try:
            st = os.fstat(fd)
            if st.st_ino != view.file_ino or st.st_size < view.offset:
                view.entries.clear()  # a new (rewritten) journal: from the start
                view.file_ino, view.offset, view.lines = st.st_ino, 0, 0
            if st.st_size == view.offset:
                return
            os.lseek(fd, view.offset, os.SEEK_SET)
            data = _read_all(fd, st.st_size - view.offset)
        except OSError:
            return
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # a line still being written waits
        for item in decode_lines(data[:end].split(b"\n")[:-1]):
            view.apply(*item)
        view.offset += end
        if view.lines > 2 * len(view.entries) + 1000:
            self._rewrite(view)

    def _append(
        self, view: _View, entries: list[tuple[str, Stamp, str | None]]
    ) -> None:
        data = b"".join(encode_line(*e) for e in entries)
        fd = self._open(view.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        if fd is None:
            return
        try:
            before = os.fstat(fd)
            if before.st_size == 0:
                data = _header(view.folder) + data
            _write_all(fd, data)
            after = os.fstat(fd)
        except OSError:
            return
        finally:
            os.close(fd)
        known = view.file_ino == before.st_ino and view.offset == before.st_size
        if before.st_size == 0 or known:
            if after.st_size == before.st_size + len(data):  # nobody else wrote
                view.file_ino, view.offset = after.st_ino, after.st_size
        size = len(view.entries)
        for entry in entries:
            view.apply(*entry)
        self._size += len(view.entries) - size

    def _rewrite(self, view: _View) -> None:
        """Rewrite a journal, one line per file (lines appended meanwhile: lost)."""
        data = _header(view.folder) + b"".join(
            encode_line(name, st, record) for name, (st, record) in view.entries.items()
        )
        tmp = f"{view.path}.{os.getpid()}-{threading.get_ident()}.tmp"
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        if fd is None:
            return
        try:
            _write_all(fd, data)
            st = os.fstat(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, view.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        finally:
            if fd >= 0:
                os.close(fd)
        view.file_ino, view.offset, view.lines = (
            st.st_ino,
            st.st_size,
            len(view.entries),
        )

    @classmethod
    def _collect_garbage(cls, root: str) -> None:
        """Remove journals of folders that are gone, or unused for `MAX_AGE`."""
        marker = os.path.join(root, ".collected")
        now = time.time()
        try:
            if now - os.lstat(marker).st_mtime < GC_EVERY:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        fd = cls._open(marker, os.O_WRONLY | os.O_CREAT)
        if fd is None:
            return
        try:
            os.utime(fd)
        except OSError:
            return
        finally:
            os.close(fd)
        try:
            entries = list(os.scandir(root))
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(".tmp") or entry.name.endswith(SUFFIX):
                with contextlib.suppress(OSError):
                    if _unused(entry, now):
                        os.unlink(entry.path)


def _unused(entry: os.DirEntry[str], now: float) -> bool:
    """Whether a journal (or a left-over temporary file) can go."""
    st = entry.stat(follow_symlinks=False)
    if now - st.st_mtime > MAX_AGE:
        return True
    if entry.name.endswith(".tmp"):
        return now - st.st_mtime > GC_EVERY
    parts = entry.name[: -len(SUFFIX)].split("-")
    if len(parts) != 3 or parts[0] != HOST_TAG:
        return False  # another host's: the age rule only
    try:
        dev, ino = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return False
    fd = Journals._open(entry.path, os.O_RDONLY)
    if fd is None:
        return False
    try:
        folder = _header_folder(os.read(fd, 65536).split(b"\n", 1)[0])
    finally:
        os.close(fd)
    if folder is None:
        return False
    try:
        found = os.stat(folder)
    except FileNotFoundError:
        return True
    return (found.st_dev, found.st_ino) != (dev, ino)


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.read(fd, min(size, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` in writes of whole lines (at most `_CHUNK` bytes each).

    On a local filesystem one ``write`` to a file opened with ``O_APPEND``
    lands whole, so lines of processes appending at once never mix; a line cut
    short anyway (a full disk, a kill) fails its digest and is ignored.
    """
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + _CHUNK) + 1
        if end <= start:  # a line longer than a chunk
            end = data.find(b"\n", start) + 1 or len(data)
        view = memoryview(data)[start:end]
        while view:
            view = view[os.write(fd, view) :]
        start = end


JOURNAL = Journals()
os.register_at_fork(after_in_child=lambda: setattr(JOURNAL, "_lock", threading.Lock()))
