"""Where checkpoints and models live: local paths and fsspec URLs.

A *location* is a local path (``str`` or ``os.PathLike``) or a URL that fsspec
understands (``s3://bucket/x``, ``memory://x``, ``gs://...``, ``file:///...``).
`filesystem` gives the `FileSystem` of a location: the few operations
checkpoints and models need (stamp, read, atomic write, list, remove).

* Local paths and ``file://`` URLs use `LocalFileSystem`: plain ``os`` calls,
  a temporary name and ``os.replace`` (the fast path, unchanged).
* Other URLs use `FsspecFileSystem`. On object stores (S3, GCS, Azure, and
  fsspec's ``memory://``) a write is one PUT of the whole object, so a reader
  sees the old object or the new one; elsewhere (SFTP, HDFS, ...) a temporary
  name and a rename.

A `Stamp` on an object store is what the store gives: the size and the ETag
when there is one (S3 and S3-compatible stores, GCS, Azure), else the size and
modification time. A filesystem is rebuilt from the location and
``storage_options`` where it is needed: objects that travel to other processes
(`CheckpointLoader`) keep those two, never an open filesystem.

Credentials come from each backend's usual environment variables and
configuration files, or from ``storage_options``, which samplepipe passes to
fsspec as given (and keeps, with the URL, in lazy samples); it has none of its
own.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from ..errors import ChangedWhileReading as ChangedWhileReading
from . import files
from .files import HOST_TAG, TMP_SUFFIX, MissingStoreError, Stamp, is_temporary_file
from .keys import is_url

LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Protocols whose stores replace a whole object at once (a PUT, or the commit
# of a multipart upload), so a single write is atomic. fsspec's memory
# filesystem commits a written file in one dictionary assignment: atomic too.
SINGLE_PUT_PROTOCOLS = frozenset(
    {
        "s3",
        "s3a",
        "gs",
        "gcs",
        "az",
        "abfs",
        "abfss",
        "oci",
        "oss",
        "memory",
    }
)
_ETAG_KEYS = ("ETag", "etag", "Etag")
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


def protocol_of(location: Any) -> str | None:
    """The URL scheme of ``location`` (lower case), or None for a local path."""
    if not is_url(location):
        return None
    return str(location).split("://", 1)[0].lower()


def is_local(location: Any) -> bool:
    """Whether ``location`` is a local path or a ``file://``/``local://`` URL."""
    protocol = protocol_of(os.fspath(location))
    return protocol is None or protocol in LOCAL_PROTOCOLS


def _local_path(url: str) -> str:
    from fsspec.implementations.local import LocalFileSystem

    return str(LocalFileSystem._strip_protocol(url))


def location_root(location: str | os.PathLike[str]) -> str:
    """The path to use for ``location``: a local path, or the URL itself.

    A ``file://`` URL becomes the local path it names; a local path is
    returned as given (``os.fspath``); another URL unchanged.
    """
    path = os.fspath(location)
    if "://" not in path:  # the common case, kept cheap: a local path
        return path
    if protocol_of(path) in LOCAL_PROTOCOLS:
        return _local_path(path)
    return path


def join_location(root: str, *parts: str) -> str:
    """Join path components below ``root`` (``os.path.join`` for local paths).

    Examples
    --------
    >>> join_location("s3://bucket/features", "step", "a.h5")
    's3://bucket/features/step/a.h5'
    """
    if not is_url(root):
        return os.path.join(root, *parts)
    tail = "/".join(p.strip("/") for p in parts if p)
    if not tail:
        return root
    return root + ("" if root.endswith("/") else "/") + tail


def normalize_location(location: str | os.PathLike[str]) -> str:
    """A canonical spelling of ``location``, to compare locations and key caches.

    Local paths (and ``file://`` URLs) become absolute, normalised paths;
    other URLs lose repeated and trailing slashes.

    Examples
    --------
    >>> normalize_location("s3://bucket//x/")
    's3://bucket/x'
    """
    root = location_root(location)
    if not is_url(root):
        return os.path.abspath(root)
    protocol, rest = root.split("://", 1)
    rest = "/".join(p for p in rest.split("/") if p)
    return f"{protocol.lower()}://{rest}"


def relative_location(path: str, root: str) -> str:
    """``path`` relative to ``root``, with ``/`` separators.

    Raises ``ValueError`` when ``path`` is not inside ``root``.
    """
    if not is_url(root):
        prefix = root if root.endswith(os.sep) else root + os.sep
        if path.startswith(prefix) and os.path.normpath(path) == path:
            return path[len(prefix) :].replace(os.sep, "/")  # relpath's answer
        return os.path.relpath(path, root).replace(os.sep, "/")
    base, full = normalize_location(root), normalize_location(path)
    if not full.startswith(base + "/"):
        msg = f"{path!r} is not inside {root!r}"
        raise ValueError(msg)
    return full[len(base) + 1 :]


def _token(text: str) -> int:
    """A 63-bit integer digest of ``text`` (stamps hold integers)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


def _mtime_ns(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, int | float):
        return int(value * 1e9)
    if isinstance(value, str) and value:
        try:
            return int(datetime.fromisoformat(value).timestamp() * 1e9)
        except ValueError:
            return _token(value)
    return 0


def stamp_from_info(info: Mapping[str, Any]) -> Stamp:
    """The `Stamp` of an object from fsspec's ``info`` (or a listing entry).

    With an ETag: ``(size, 0, digest of the ETag, 0)``; the ETag changes
    whenever the content does (it is the MD5 of the bytes for single-PUT S3
    objects). Otherwise ``(size, modification time, inode or 0, 0)``.
    """
    size = int(info.get("size") or info.get("Size") or 0)
    for key in _ETAG_KEYS:
        etag = info.get(key)
        if etag:
            return Stamp(size, 0, _token(str(etag).strip('"')), 0)
    mtime = 0
    for key in _MTIME_KEYS:
        if info.get(key):
            mtime = _mtime_ns(info[key])
            break
    ino = info.get("ino")
    return Stamp(size, mtime, int(ino) if isinstance(ino, int) else 0, 0)


def _matches(st: Stamp, blob: bytes) -> bool:
    """Whether ``blob`` is the content of stamp ``st`` (an ETag that is its MD5)."""
    if st.size != len(blob) or not st.ino or st.mtime_ns:
        return False
    return st.ino == _token(hashlib.md5(blob, usedforsecurity=False).hexdigest())


class FileSystem(ABC):
    """What checkpoints and models need from the place they are stored.

    Paths given to the methods are those of `location_root` and
    `join_location`: local paths for a `LocalFileSystem`, URLs otherwise.

    Attributes
    ----------
    local : bool
        Whether paths are local paths (the ``os`` fast paths apply).
    token : str
        Tells stores apart in process-wide caches (the validation cache).
    """

    local: bool = False
    token: str = ""

    @abstractmethod
    def stamp(self, path: str) -> Stamp | None:
        """The `Stamp` of the file at ``path``, None if there is none."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole content; ``FileNotFoundError`` if missing."""

    @abstractmethod
    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the file (fewer at its end)."""

    @abstractmethod
    def read_stamped(
        self, path: str, known: Stamp | None = None
    ) -> tuple[bytes, Stamp] | None:
        """``(content, stamp)`` of one version of the file; None if missing.

        ``known`` is a stamp seen shortly before (in a listing): when the
        content read is provably that version, no new stamp is fetched.
        Raises `ChangedWhileReading` if the file kept changing while it was
        read.
        """

    @abstractmethod
    def write_bytes(self, path: str, blob: bytes, *, fsync: bool = False) -> Stamp:
        """Write ``blob`` to ``path`` atomically; return the stamp written.

        A reader sees the old file or the new one, never a part of one. The
        folder must exist (`makedirs`). ``fsync`` flushes a local file and its
        folder to disk before returning.
        """

    @abstractmethod
    def remove(self, path: str) -> None:
        """Remove the file at ``path``; nothing if it is already gone."""

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents (nothing on object stores)."""

    @abstractmethod
    def isdir(self, path: str) -> bool:
        """Whether a folder is at ``path``."""

    @abstractmethod
    def dirname(self, path: str) -> str:
        """The folder of ``path``."""

    @abstractmethod
    def walk_files(self, root: str) -> Iterator[tuple[str, str, int, Stamp | None]]:
        """``(path, relative path with '/', size, stamp)`` of every file, sorted.

        ``stamp`` is the one the listing gave when it identifies the content
        (an ETag), else None.
        """

    @abstractmethod
    def remove_stale_temporaries(self, folder: str) -> list[str]:
        """Remove temporary files of crashed writers in ``folder``."""


class LocalFileSystem(FileSystem):
    """Local paths: ``os`` calls, temporary name + ``os.replace``."""

    local = True
    token = "local"

    def stamp(self, path: str) -> Stamp | None:
        return files.stamp(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_range(self, path: str, start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def read_stamped(
        self, path: str, known: Stamp | None = None
    ) -> tuple[bytes, Stamp] | None:
        before = files.stamp(path)
        if before is None:
            return None
        try:
            blob = self.read_bytes(path)
        except FileNotFoundError:
            return None
        if files.stamp(path) != before:
            raise ChangedWhileReading(errno.EAGAIN, f"{path!r} changed while read")
        return blob, before

    def write_bytes(self, path: str, blob: bytes, *, fsync: bool = False) -> Stamp:
        files.write_bytes(path, blob, fsync=fsync)
        st = files.stamp(path)
        if st is None:  # removed right after it was written
            raise FileNotFoundError(errno.ENOENT, f"{path!r} vanished after writing")
        return st

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def makedirs(self, path: str) -> None:
        if path:
            os.makedirs(path, exist_ok=True)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path)

    def walk_files(self, root: str) -> Iterator[tuple[str, str, int, Stamp | None]]:
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(folder, name)
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:
                    continue
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                yield path, rel, size, None

    def remove_stale_temporaries(self, folder: str) -> list[str]:
        return files.remove_stale_temporaries(folder)

    def __repr__(self) -> str:
        return "LocalFileSystem()"


LOCAL = LocalFileSystem()


class FsspecFileSystem(FileSystem):
    """A filesystem of fsspec, addressed by URLs.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
        The fsspec filesystem (built by `filesystem`).
    protocol : str
        The URL scheme paths start with.
    """

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.single_put = protocol in SINGLE_PUT_PROTOCOLS
        self.token = f"{protocol}:{fs._fs_token}"
        # s3fs fetches the size (a HEAD) before each whole-object read when it
        # may read in parallel ranges; one GET is enough here.
        self._read_options: dict[str, Any] = (
            {"max_concurrency": 1} if hasattr(fs, "max_concurrency") else {}
        )

    # -- reading -----------------------------------------------------------
    def stamp(self, path: str) -> Stamp | None:
        self.fs.invalidate_cache(path)  # never a stale directory listing
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type", "file") != "file":
            return None
        return stamp_from_info(info)

    def read_bytes(self, path: str) -> bytes:
        """The whole object in one GET."""
        return bytes(self.fs.cat_file(path, **self._read_options))

    def read_range(self, path: str, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(path, start=start, end=end))

    def _read_small(self, path: str) -> bytes | None:
        try:
            return self.read_bytes(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def read_stamped(
        self, path: str, known: Stamp | None = None
    ) -> tuple[bytes, Stamp] | None:
        """One GET and one HEAD when the store's ETag is the MD5 of the bytes.

        Only the GET when the bytes match ``known`` (from a listing).
        Otherwise (no ETag, or an opaque one) the object is read again between
        two stamps, to be sure the bytes belong to the stamp returned.
        """
        blob = self._read_small(path)
        if blob is None:
            return None
        if known is not None and _matches(known, blob):
            return blob, known
        st = self.stamp(path)
        if st is None:
            return None
        if _matches(st, blob):
            return blob, st
        again = self._read_small(path)
        if again is None:
            return None
        if self.stamp(path) != st or st.size != len(again):
            raise ChangedWhileReading(errno.EAGAIN, f"{path!r} changed while read")
        return again, st

    # -- writing -----------------------------------------------------------
    def write_bytes(self, path: str, blob: bytes, *, fsync: bool = False) -> Stamp:
        try:
            if self.single_put:
                out = self.fs.pipe_file(path, blob)
                etag = out.get("ETag") if isinstance(out, Mapping) else None
                if etag:  # the PUT's own answer: exactly the object we wrote
                    return stamp_from_info({"size": len(blob), "ETag": etag})
            else:
                self._write_renaming(path, blob)
        except FileNotFoundError as exc:
            msg = (
                f"cannot write {path!r}: the bucket or folder does not exist "
                f"({exc}); create it first"
            )
            raise MissingStoreError(errno.ENOENT, msg) from exc
        except IsADirectoryError as exc:
            msg = f"cannot write {path!r}: a folder of that name exists"
            raise IsADirectoryError(errno.EISDIR, msg) from exc
        except PermissionError as exc:
            msg = f"cannot write {path!r}: permission denied ({exc})"
            raise PermissionError(errno.EACCES, msg) from exc
        st = self.stamp(path)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, f"{path!r} vanished after writing")
        return st

    def _write_renaming(self, path: str, blob: bytes) -> None:
        folder, name = posixpath.split(path)
        tag = f"{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = posixpath.join(folder, f".{name}.{tag}{TMP_SUFFIX}")
        try:
            self.fs.pipe_file(tmp, blob)
            self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except (OSError, NotImplementedError):
                pass
            raise

    def remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def makedirs(self, path: str) -> None:
        if not self.single_put:
            self.fs.makedirs(path, exist_ok=True)

    def isdir(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return bool(self.fs.isdir(path))

    def dirname(self, path: str) -> str:
        return posixpath.dirname(path)

    # -- listing -----------------------------------------------------------
    def walk_files(self, root: str) -> Iterator[tuple[str, str, int, Stamp | None]]:
        """One recursive listing (paginated), not one request per folder."""
        self.fs.invalidate_cache(root)
        try:
            found = self.fs.find(root, detail=True, withdirs=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        base = str(self.fs._strip_protocol(root)).rstrip("/")
        for stripped in sorted(found):
            info = found[stripped]
            if info.get("type", "file") != "file" or not stripped.startswith(
                base + "/"
            ):
                continue
            rel = stripped[len(base) + 1 :]
            st = stamp_from_info(info)
            known = st if any(info.get(k) for k in _ETAG_KEYS) else None
            yield join_location(root, rel), rel, st.size, known

    def remove_stale_temporaries(
        self, folder: str, max_age: float = 3600.0
    ) -> list[str]:
        """Temporaries exist only where writes rename: none on object stores."""
        if self.single_put:
            return []
        removed: list[str] = []
        try:
            entries = self.fs.ls(folder, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return removed
        now = time.time()
        mine = f".{HOST_TAG}-{os.getpid()}-"
        for info in entries:
            name = posixpath.basename(str(info.get("name", "")))
            if not is_temporary_file(name) or mine in name:
                continue
            mtime = _mtime_ns(next((info[k] for k in _MTIME_KEYS if info.get(k)), 0))
            old = bool(mtime) and now - mtime / 1e9 > max_age
            if old or not files._owner_alive(name):
                path = join_location(folder, name)
                self.remove(path)
                removed.append(path)
        return removed

    def __repr__(self) -> str:
        return f"FsspecFileSystem({type(self.fs).__name__}, {self.protocol!r})"


def check_location(location: Any, name: str, owner: str = "CheckpointWrapper") -> None:
    """Raise a clear error unless fsspec can open URL ``location``.

    Nothing is contacted: only the protocol and its package are checked.
    ``ValueError`` for an unknown or chained protocol, ``ImportError`` when
    the backend's package is missing.
    """
    path = os.fspath(location)
    if "::" in path and "://" in path:
        msg = (
            f"{owner} got {name}={path!r}; chained fsspec URLs (with '::') are "
            "not supported: give one filesystem's URL."
        )
        raise ValueError(msg)
    protocol = protocol_of(path)
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as exc:
        msg = (
            f"{owner} got {name}={path!r}; fsspec does not know protocol "
            f"{protocol!r}: give a local path or a URL such as 's3://bucket/x'."
        )
        raise ValueError(msg) from exc
    except ImportError as exc:
        msg = (
            f"{owner} got {name}={path!r}; its filesystem needs a package that "
            f"is not installed ({exc})."
        )
        raise ImportError(msg) from exc


def filesystem(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
) -> FileSystem:
    """The `FileSystem` of ``location``.

    Parameters
    ----------
    location : str or os.PathLike
        A local path or an fsspec URL.
    storage_options : dict, default=None
        Passed to the fsspec filesystem (e.g. ``{"endpoint_url": ...}`` for
        S3); unused for local paths.

    Returns
    -------
    fs : FileSystem
        `LOCAL` for local paths and ``file://`` URLs.

    Examples
    --------
    >>> filesystem("/tmp/features")
    LocalFileSystem()
    >>> filesystem("memory://features")
    FsspecFileSystem(MemoryFileSystem, 'memory')
    """
    path = os.fspath(location)
    protocol = protocol_of(path)
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return LOCAL
    from fsspec.core import url_to_fs

    fs, _ = url_to_fs(path, **dict(storage_options or {}))
    return FsspecFileSystem(fs, protocol)


def stamp_of(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
) -> Stamp | None:
    """The `Stamp` of the file or object at ``location``; None if there is none.

    For the flows' manifests: a file is unchanged while its stamp is. Locally
    ``(size, mtime_ns, inode, ctime_ns)``; on a store with ETags ``(size, 0,
    digest of the ETag, 0)``; else ``(size, mtime_ns, 0, 0)``. One ``stat``
    locally, one HEAD request on an object store.
    """
    root = location_root(location)
    return filesystem(root, storage_options).stamp(root)
