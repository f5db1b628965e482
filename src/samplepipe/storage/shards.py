"""The sharded layout: many samples' checkpoints in one HDF5 file per batch.

A *shard* is an HDF5 file ``<features_dir>/shard-<time>-<host>-<pid>-<random>.h5``
written once, atomically (a temporary name and a rename, or one PUT on object
stores), and never changed afterwards. It holds:

``data/<g>``
    the payloads (as `samplepipe.storage.hdf5.encode` makes them) of equally
    shaped values of one dtype, stacked: entry ``(g, row)`` is
    ``f["data/<g>"][row]``;
``records``
    the entries' records, one line each (UTF-8): the same
    `Identity.record` text, with the payload checksum, that a file of the
    default layout holds;
``entries``
    ``(group, row, time)`` per entry; ``time`` orders entries of one key
    (a newer entry supersedes an older one);
attributes ``samplepipe-shard`` (the shard format) and ``index-checksum``
    (BLAKE2b of ``records`` and ``entries``).

There is no other index: the key -> (shard, entry) map is rebuilt from a
listing of the folder and each shard's own index, and kept per process
(`ShardFolder`), refreshed by one listing per call. A crash loses at most the
shard being written; a reader never meets a half-written shard.

Statuses of an entry, judged by a step (as `iter_checkpoints` does): ``valid``
(this step's newest entry of its key, payload checksum verified), ``stale``
(another step, or superseded by a newer entry of the same key), ``corrupt``
(its payload fails its checksum). A shard file is ``valid`` while it holds a
valid entry, else ``stale`` (or ``corrupt`` when every entry is), ``corrupt``
when it cannot be read, ``unknown`` when it is readable HDF5 samplepipe did not
write; ``temporary``/``writing`` for temporary files of shard writers.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..errors import ShardError as ShardError
from . import hdf5
from .checkpoints import CheckpointLoader, CorruptCheckpointError
from .files import HOST_TAG, TMP_SUFFIX, Stamp, is_temporary_file
from .files import _owner_alive as _temporary_owner_alive
from .fs import (
    LOCAL,
    ChangedWhileReading,
    FileSystem,
    FsspecFileSystem,
    filesystem,
    join_location,
    location_root,
    normalize_location,
    stamp_from_info,
)
from .identity import FORMAT_VERSION, Identity

SHARD_FORMAT = 1
SHARD_ATTRIBUTE = "samplepipe-shard"
INDEX_CHECKSUM_ATTRIBUTE = "index-checksum"
DEFAULT_SHARD_SIZE = None  # no limit on the entries of a shard: its bytes decide
DEFAULT_SHARD_BYTES = 64 * 2**20
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SHARD_NAME = re.compile(r"shard-\d{20}-[0-9a-f]{8}-\d+-[0-9a-f]{8}\.h5\Z")
_READ_ATTEMPTS = 3


def shard_name(time_ns: int) -> str:
    """A new shard's file name: its time (sorts by age), host, process, random."""
    return f"shard-{time_ns:020d}-{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}.h5"


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is the name of a shard samplepipe writes."""
    return _SHARD_NAME.match(name) is not None


def is_shard_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of a shard being written."""
    if not is_temporary_file(name):
        return False
    inner = name[1 : -len(TMP_SUFFIX)].rsplit(".", 1)[0]
    return is_shard_name(inner)


def shard_limits(shard_size: Any, shard_bytes: Any, who: str) -> tuple[int | None, int]:
    """``(shard_size, shard_bytes)`` checked; ``shard_bytes`` as a number of bytes.

    ``shard_size`` is None (no limit) or an int >= 1; ``shard_bytes`` an int
    >= 1 or a str such as ``"64M"`` (K, M, G, T: powers of 1024, as joblib's
    ``max_nbytes``). ``who`` names the caller in the error.
    """
    if shard_size is not None and (
        not isinstance(shard_size, int | np.integer)
        or isinstance(shard_size, bool)
        or shard_size < 1
    ):
        msg = (
            f"{who} got shard_size={shard_size!r}; it must be an int >= 1 (samples "
            "per shard) or None (no limit: shard_bytes alone decides)."
        )
        raise ValueError(msg)
    nbytes: int | None = None
    if isinstance(shard_bytes, int | np.integer) and not isinstance(shard_bytes, bool):
        nbytes = int(shard_bytes)
    elif isinstance(shard_bytes, str):
        match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", shard_bytes.upper())
        if match is not None:
            nbytes = int(match[1]) * _UNITS[match[2]]
    if nbytes is None or nbytes < 1:
        msg = (
            f"{who} got shard_bytes={shard_bytes!r}; it must be a number of bytes "
            "(an int >= 1) or a str such as '64M' or '1G', e.g. "
            f"shard_bytes={DEFAULT_SHARD_BYTES} (64 MiB, the default)."
        )
        raise ValueError(msg)
    return (None if shard_size is None else int(shard_size)), nbytes


def split_points(
    sizes: Sequence[int], shard_size: int | None, shard_bytes: int
) -> list[int]:
    """Where entries of these payload sizes are cut into shards (end indices).

    A shard takes entries in order while it holds fewer than ``shard_size``
    and its payload stays within ``shard_bytes``; it holds at least one.
    """
    ends: list[int] = []
    count = total = 0
    for i, size in enumerate(sizes):
        if count and (
            total + size > shard_bytes
            or (shard_size is not None and count >= shard_size)
        ):
            ends.append(i)
            count = total = 0
        count += 1
        total += size
    if count:
        ends.append(len(sizes))
    return ends


# ---------------------------------------------------------------------------
# the file format
# ---------------------------------------------------------------------------
def _index_checksum(records: bytes, entries: np.ndarray) -> str:
    h = hashlib.blake2b(records, digest_size=16)
    h.update(np.ascontiguousarray(entries, dtype="<i8").tobytes())
    return h.hexdigest()


def stack_payloads(
    payloads: Sequence[np.ndarray],
) -> tuple[list[tuple[int, int]], dict[int, np.ndarray]]:
    """Stack payloads of one dtype and shape: ``([(group, row)], {group: array})``."""
    if payloads:
        first = payloads[0]
        dtype, shape = first.dtype, first.shape
        if all(p.dtype == dtype and p.shape == shape for p in payloads):
            one = np.stack(payloads)  # one group: the common case
            if one.dtype.str == dtype.str:
                return [(0, row) for row in range(len(payloads))], {0: one}
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, payload in enumerate(payloads):
        groups.setdefault((payload.dtype.str, payload.shape), []).append(i)
    where: list[tuple[int, int]] = [(0, 0)] * len(payloads)
    stacked: dict[int, np.ndarray] = {}
    for g, members in enumerate(groups.values()):
        first = payloads[members[0]]
        data = np.empty((len(members), *first.shape), dtype=first.dtype)
        for row, i in enumerate(members):
            data[row] = payloads[i]
            where[i] = (g, row)
        stacked[g] = data
    return where, stacked


def shard_image(
    records: Sequence[str], entries: np.ndarray, stacked: Mapping[int, np.ndarray]
) -> bytes:
    """The bytes of a shard file: index, records and stacked payloads."""
    import h5py

    text = "\n".join(records).encode("utf-8", "surrogatepass")
    name = f"samplepipe-shard-{threading.get_ident()}-{id(entries)}"
    size = sum(a.nbytes for a in stacked.values()) + len(text) + entries.nbytes
    with (
        hdf5.H5_LOCK,
        h5py.File(
            name,
            "w",
            driver="core",
            backing_store=False,
            block_size=max(1 << 16, min(size + (1 << 16), 64 << 20)),
        ) as f,
    ):
        f.attrs[SHARD_ATTRIBUTE] = SHARD_FORMAT
        f.attrs[INDEX_CHECKSUM_ATTRIBUTE] = _index_checksum(text, entries)
        f.create_dataset("records", data=np.frombuffer(text, np.uint8))
        f.create_dataset("entries", data=entries)
        data = f.create_group("data")
        for g, array in stacked.items():
            data.create_dataset(str(g), data=array)
        f.flush()
        return f.id.get_file_image()


class RowDigests:
    """`samplepipe.storage.hdf5.checksum` of rows of stacked payloads.

    Equal to the checksum of each row as a payload of its own, from one
    buffer per group and one digest of each header (kind, dtype, shape).
    """

    def __init__(self, arrays: Mapping[int, np.ndarray]) -> None:
        self.arrays = arrays
        self._buffers: dict[int, tuple[memoryview, int, str, int]] = {}
        self._bases: dict[tuple[int, str], Any] = {}

    def __call__(self, group: int, row: int, kind: str) -> str | None:
        """The checksum of entry ``(group, row)`` as ``kind``; None if absent."""
        found = self._buffers.get(group)
        if found is None:
            array = self.arrays.get(group)
            if array is None:
                return None
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
            header = f"{array.dtype.str}|{array.shape[1:]}"
            found = self._buffers[group] = (flat.data, row_bytes, header, len(array))
        buffer, row_bytes, header, rows = found
        if not 0 <= row < rows:
            return None
        base = self._bases.get((group, kind))
        if base is None:
            text = f"{kind}|{header}".encode()
            base = self._bases[(group, kind)] = hashlib.blake2b(text, digest_size=16)
        h = base.copy()
        h.update(buffer[row * row_bytes : (row + 1) * row_bytes])
        return h.hexdigest()

    def many(
        self, where: Sequence[Sequence[int]], kinds: Sequence[str]
    ) -> list[str | None]:
        """The checksums of entries ``where[i] = (group, row)`` as ``kinds[i]``."""
        digests: list[str | None] = []
        append = digests.append
        ready: dict[tuple[int, str], tuple[memoryview, int, int, Any]] = {}
        for (group, row), kind in zip(where, kinds):
            found = ready.get((group, kind))
            if found is None:
                if self(group, 0, kind) is None:  # no such group, or empty
                    append(None)
                    continue
                buffer, row_bytes, _, rows = self._buffers[group]
                base = self._bases[(group, kind)]
                found = ready[(group, kind)] = (buffer, row_bytes, rows, base)
            buffer, row_bytes, rows, base = found
            if not 0 <= row < rows:
                append(None)
                continue
            h = base.copy()
            h.update(buffer[row * row_bytes : (row + 1) * row_bytes])
            append(h.hexdigest())
        return digests


def _read_index(f: Any) -> tuple[list[str], np.ndarray]:
    """``(records, entries)`` of an open shard; `ShardError` if malformed."""
    if SHARD_ATTRIBUTE not in f.attrs:
        raise LookupError("not a samplepipe shard")
    try:
        if int(f.attrs[SHARD_ATTRIBUTE]) != SHARD_FORMAT:
            raise ShardError("a shard of another format")
        text = f["records"][()].tobytes()
        entries = np.asarray(f["entries"][()], dtype="<i8")
        expected = f.attrs[INDEX_CHECKSUM_ATTRIBUTE]
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ShardError(f"unreadable shard index: {exc}") from exc
    if isinstance(expected, bytes):
        expected = expected.decode("ascii", "replace")
    if expected != _index_checksum(text, entries):
        raise ShardError("the shard index fails its checksum")
    records = text.decode("utf-8", "surrogatepass").split("\n") if text else []
    if entries.ndim != 2 or entries.shape != (len(records), 3):
        raise ShardError("the shard index is malformed")
    return records, entries


def _read_data(f: Any, entries: np.ndarray) -> dict[int, np.ndarray]:
    """Every payload group an index names, read whole."""
    groups = sorted({int(g) for g in entries[:, 0]}) if len(entries) else []
    try:
        return {g: f[f"data/{g}"][()] for g in groups}
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ShardError(f"unreadable shard data: {exc}") from exc


def _payload(arrays: Mapping[int, np.ndarray], group: int, row: int) -> np.ndarray:
    array = arrays[group]
    if not 0 <= row < len(array):
        raise ShardError("an entry beyond its group")
    return array[row, ...]


def _checksum_ok(payload: np.ndarray, record: str) -> bool:
    parts = record.split(":", 5)
    if len(parts) != 6:
        return False
    return hdf5.checksum(payload, parts[4]) == parts[3]


# ---------------------------------------------------------------------------
# payloads read in this process
# ---------------------------------------------------------------------------
class ShardData:
    """A bounded LRU of shard payloads: ``(store, path) -> (stamp, arrays)``.

    Shards are read whole when they are validated; lazy samples then load
    from here instead of opening the file once per sample. ``maxbytes`` bounds
    the memory (a shard larger than it is never kept).
    """

    def __init__(self, maxbytes: int = 256 << 20) -> None:
        self.maxbytes = maxbytes
        self._items: OrderedDict[str, tuple[Stamp, dict[int, np.ndarray], int]] = (
            OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, st: Stamp, arrays: dict[int, np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:
            self._pop(key)
            if size > self.maxbytes:
                return
            self._items[key] = (st, arrays, size)
            self._bytes += size
            while self._bytes > self.maxbytes:
                _, (_, _, old) = self._items.popitem(last=False)
                self._bytes -= old

    def get(self, key: str) -> tuple[Stamp, dict[int, np.ndarray]] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0], item[1]

    def _pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[2]

    def forget(self, key: str) -> None:
        with self._lock:
            self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


DATA = ShardData()

# A local shard up to this size is read whole when one of its entries misses
# `DATA` (one open instead of one per entry); a larger one, row by row. As
# large as `DATA` keeps: shards of the default 64 MiB are read whole.
WHOLE_READ_BYTES = 256 << 20


# ---------------------------------------------------------------------------
# one shard's index, one folder of shards
# ---------------------------------------------------------------------------
@dataclass
class ShardIndex:
    """The index of one shard file as of one stamp.

    ``status`` is ``ok``, ``corrupt`` (unreadable, or a broken index) or
    ``unknown`` (readable HDF5 that samplepipe did not write). ``verified``
    holds, per entry, whether its payload matched its checksum (None: not
    checked yet).
    """

    path: str
    stamp: Stamp
    size: int
    status: str = "ok"
    records: list[str] = field(default_factory=list)
    entries: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), "<i8"))
    verified: list[bool | None] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._locations: list[list[int]] | None = None
        self._fields: tuple[list[str], list[str]] | None = None
        if len(self.keys) != len(self.records):
            keys: list[str] = []
            checksums: list[str] = []
            kinds: list[str] = []
            for record in self.records:
                parts = record.split(":", 5)
                keys.append(parts[-1])
                if len(parts) == 6:
                    checksums.append(parts[3])
                    kinds.append(parts[4])
                else:
                    checksums.append("")
                    kinds.append("")
            self.keys = keys
            self._fields = checksums, kinds

    def fields(self) -> tuple[list[str], list[str]]:
        """``(checksums, kinds)`` of the entries' records ("" if malformed)."""
        if self._fields is None:
            parts = [r.split(":", 5) for r in self.records]
            self._fields = (
                [p[3] if len(p) == 6 else "" for p in parts],
                [p[4] if len(p) == 6 else "" for p in parts],
            )
        return self._fields

    def locations(self) -> list[list[int]]:
        """``[group, row]`` of each entry (converted from ``entries`` once)."""
        if self._locations is None:
            self._locations = self.entries[:, :2].tolist()
        return self._locations


_GONE = ShardIndex("", Stamp(0, 0, 0, 0), 0, "missing")


class Found(NamedTuple):
    """Where a valid entry is: its shard and position."""

    shard: ShardIndex
    position: int

    @property
    def record(self) -> str:
        return self.shard.records[self.position]


def _prefix(wanted: Identity) -> str:
    """What the record of a valid entry of ``wanted`` starts with (its key aside)."""
    return f"{wanted.format}:{wanted.step}:{wanted.inputs}:"


def _of_step(record: str, step: str) -> bool:
    return record.startswith(f"{FORMAT_VERSION}:{step}:")


class ShardFolder:
    """The shards of one folder, as this process last listed them.

    Use `shard_folder` to get the one instance per folder and store. Every
    public method lists the folder again first (one ``scandir``, or one LIST
    request on a store); indices of shards seen before, with the same stamp,
    are not read again.
    """

    def __init__(self, root: str, fs: FileSystem, storage_options: Any = None):
        self.root = root
        self.fs = fs
        self.storage_options = storage_options
        self.shards: dict[str, ShardIndex] = {}
        self.by_key: dict[str, list[tuple[int, str, int]]] = {}
        self.others: dict[str, tuple[int, Stamp | None]] = {}  # temporaries
        self.max_time = 0
        self.lock = threading.RLock()

    # -- listing -----------------------------------------------------------
    def _cache_key(self, path: str) -> str:
        return f"{self.fs.token}|{path}"

    def _list(self) -> dict[str, tuple[str, int, Stamp | None]]:
        """``name -> (path, size, stamp or None)`` of shards and temporaries."""
        found: dict[str, tuple[str, int, Stamp | None]] = {}
        if self.fs.local:
            try:
                scan = list(os.scandir(self.root))
            except (FileNotFoundError, NotADirectoryError):
                return found
            for entry in scan:
                name = entry.name
                if not (is_shard_name(name) or is_shard_temporary(name)):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[name] = (
                    entry.path,
                    st.st_size,
                    Stamp.of(st) if entry.is_file(follow_symlinks=False) else None,
                )
            return found
        assert isinstance(self.fs, FsspecFileSystem)
        inner = self.fs.fs
        inner.invalidate_cache(self.root)
        try:
            listing = inner.ls(self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return found
        for info in listing:
            name = posixpath.basename(str(info.get("name", "")).rstrip("/"))
            if info.get("type", "file") != "file":
                continue
            if is_shard_name(name) or is_shard_temporary(name):
                listed = stamp_from_info(info)
                found[name] = (join_location(self.root, name), listed.size, listed)
        return found

    def refresh(self) -> None:
        """List the folder; read the index of each new or changed shard."""
        for _ in range(_READ_ATTEMPTS):
            if self._refresh_once():
                return

    def _refresh_once(self) -> bool:
        listed = self._list()
        vanished = False
        seen: set[str] = set()
        others: dict[str, tuple[int, Stamp | None]] = {}
        for name, (path, size, st) in sorted(listed.items()):
            if not is_shard_name(name):
                others[path] = (size, st)
                continue
            seen.add(path)
            known = self.shards.get(path)
            if known is not None and st is not None and known.stamp == st:
                continue
            self._drop(path)  # before reading: the read may keep its payloads
            index = self._read_index(path, size, st)
            if index is None:
                vanished = True
                seen.discard(path)
                continue
            self._add(index)
        for path in list(self.shards):
            if path not in seen:
                self._drop(path)
        self.others = others
        return not vanished

    def _read_index(
        self, path: str, size: int, listed: Stamp | None
    ) -> ShardIndex | None:
        """The index of the shard at ``path``; None if it vanished."""
        import h5py

        if self.fs.local:
            if listed is None:  # a symbolic link or a folder: not ours
                return ShardIndex(path, Stamp(size, 0, 0, 0), size, "unknown")
            for _ in range(_READ_ATTEMPTS):
                try:
                    with hdf5.H5_LOCK, h5py.File(path, "r") as f:
                        records, entries = _read_index(f)
                    status = "ok"
                except FileNotFoundError:
                    return None
                except LookupError:
                    records, entries, status = [], np.zeros((0, 3), "<i8"), "unknown"
                except (OSError, ShardError):
                    records, entries, status = [], np.zeros((0, 3), "<i8"), "corrupt"
                after = LOCAL.stamp(path)
                if after is None:
                    return None
                if after == listed:
                    return ShardIndex(
                        path,
                        after,
                        size,
                        status,
                        records,
                        entries,
                        [None] * len(records),
                    )
                listed = after  # changed while read: read it again
            return ShardIndex(path, listed, size, "corrupt")
        try:
            stamped = self.fs.read_stamped(path, listed)
        except ChangedWhileReading:
            st = self.fs.stamp(path)
            if st is None:
                return None
            return ShardIndex(path, st, size, "corrupt")
        if stamped is None:
            return None
        blob, st = stamped
        return self._index_of_bytes(path, blob, st)[0]

    def _index_of_bytes(
        self, path: str, blob: bytes, st: Stamp
    ) -> tuple[ShardIndex, dict[int, np.ndarray] | None]:
        """Index and payloads of a whole shard read from a store.

        Every entry is verified at once (the payloads are at hand) and the
        payloads are kept in `DATA`.
        """
        try:
            with hdf5.H5_LOCK, hdf5._open_image(blob) as f:
                records, entries = _read_index(f)
                arrays = _read_data(f, entries)
        except LookupError:
            return ShardIndex(path, st, len(blob), "unknown"), None
        except (OSError, ValueError):  # ShardError is a ValueError
            return ShardIndex(path, st, len(blob), "corrupt"), None
        index = ShardIndex(
            path, st, len(blob), "ok", records, entries, [None] * len(records)
        )
        self._verify_all(index, arrays)
        DATA.put(self._cache_key(path), st, arrays)
        return index, arrays

    def _add(self, index: ShardIndex) -> None:
        self.shards[index.path] = index
        if index.status != "ok" or not index.records:
            return
        times = index.entries[:, 2].tolist()
        self.max_time = max(self.max_time, max(times))
        by_key, path = self.by_key, index.path
        for position, (key, t) in enumerate(zip(index.keys, times)):
            refs = by_key.get(key)
            if refs is None:
                by_key[key] = [(t, path, position)]
            else:
                refs.append((t, path, position))
                refs.sort(reverse=True)

    def _drop(self, path: str) -> None:
        index = self.shards.pop(path, None)
        DATA.forget(self._cache_key(path))
        if index is None or index.status != "ok":
            return
        for key in set(index.keys):
            refs = self.by_key.get(key)
            if refs is None:
                continue
            kept = [r for r in refs if r[1] != path]
            if kept:
                self.by_key[key] = kept
            else:
                del self.by_key[key]

    # -- verifying payloads ------------------------------------------------
    def _verify_all(self, index: ShardIndex, arrays: Mapping[int, np.ndarray]) -> None:
        """Check every entry's payload against the checksum of its record."""
        checksums, kinds = index.fields()
        digests = RowDigests(arrays).many(index.locations(), kinds)
        index.verified = [
            bool(checksum) and digest == checksum
            for digest, checksum in zip(digests, checksums)
        ]

    def _arrays(self, index: ShardIndex) -> dict[int, np.ndarray] | None:
        """The payloads of a shard as of its index's stamp; None if it changed."""
        cached = DATA.get(self._cache_key(index.path))
        if cached is not None and cached[0] == index.stamp:
            return cached[1]
        if not self.fs.local:
            stamped = self.fs.read_stamped(index.path, index.stamp)
            if stamped is None or stamped[1] != index.stamp:
                return None
            again, arrays = self._index_of_bytes(index.path, *stamped)
            return arrays if again.status == "ok" else None
        import h5py

        try:
            with hdf5.H5_LOCK, h5py.File(index.path, "r") as f:
                arrays = _read_data(f, index.entries)
        except FileNotFoundError:
            return None
        if LOCAL.stamp(index.path) != index.stamp:
            return None
        DATA.put(self._cache_key(index.path), index.stamp, arrays)
        return arrays

    def verify(self, index: ShardIndex) -> bool:
        """Check every payload of a shard against its checksum (once per stamp).

        Returns False when the shard vanished or changed since it was indexed:
        it is then forgotten (read again on the next refresh) and none of its
        entries counts as verified.
        """
        if index.status != "ok" or all(v is not None for v in index.verified):
            return True
        try:
            arrays = self._arrays(index)
        except (OSError, ShardError):
            arrays = None
        if arrays is None:
            index.verified = [False] * len(index.records)
            with self.lock:
                if self.shards.get(index.path) is index:
                    self._drop(index.path)
            return False
        self._verify_all(index, arrays)
        return True

    # -- finding -----------------------------------------------------------
    def find(self, wanted: Sequence[Identity]) -> list[Found | str]:
        """Per identity: its newest valid, verified entry, else its status.

        The status is ``missing`` (no entry of the key), ``corrupt`` (an entry
        of this identity fails its checksum) or ``stale``. A shard that
        vanished while it was read (compacted, cleaned) sends the search
        back to a new listing: entries that moved are found where they went.
        """
        with self.lock:
            for _ in range(_READ_ATTEMPTS):
                self.refresh()
                results, settled = self._find_once(wanted)
                if settled:
                    break
            return results

    def _find_once(self, wanted: Sequence[Identity]) -> tuple[list[Found | str], bool]:
        by_key, shards = self.by_key, self.shards
        settled = True
        results: list[Found | str] = []
        for ident in wanted:
            prefix = _prefix(ident)
            refs = by_key.get(ident.key)
            if not refs:
                results.append("missing")
                continue
            result: Found | str = "stale"
            for _, path, position in refs:
                index = shards.get(path) or _GONE
                if position < len(index.records) and index.records[position].startswith(
                    prefix
                ):
                    ok = index.verified[position]
                    if ok is None and self.verify(index) is False:
                        settled = False
                    if index.verified[position]:
                        result = Found(index, position)
                        break
                    result = "corrupt"
            results.append(result)
        return results, settled

    def find_record(self, record: str) -> Found | None:
        """The newest verified entry holding exactly ``record``."""
        key = record.split(":", 5)[-1]
        with self.lock:
            self.refresh()
            for _, path, position in list(self.by_key.get(key, ())):
                index = self.shards.get(path)
                if index is None or index.records[position] != record:
                    continue
                self.verify(index)
                if index.verified[position]:
                    return Found(index, position)
        return None

    # -- writing -----------------------------------------------------------
    def next_time(self) -> int:
        """A time newer than every entry seen: a clock that never steps back."""
        with self.lock:
            self.max_time = max(time.time_ns(), self.max_time + 1)
            return self.max_time

    def write(
        self,
        records: Sequence[str],
        payloads: Sequence[np.ndarray],
        times: Sequence[int] | None = None,
    ) -> ShardIndex:
        """Write one new shard of these entries atomically; entry i at position i.

        Entries take a new time unless ``times`` is given (compaction keeps
        the times of the entries it copies).
        """
        where, stacked = stack_payloads(payloads)
        return self._write(list(records), where, stacked, times)

    def write_new(
        self,
        identities: Sequence[Identity],
        payloads: Sequence[np.ndarray],
        kinds: Sequence[str],
    ) -> ShardIndex:
        """`write` of encoded payloads: their records are made here.

        Each record is ``identity.record(checksum, kind)``, the checksum
        computed from the stacked payloads (equal to
        `samplepipe.storage.hdf5.checksum`).
        """
        where, stacked = stack_payloads(payloads)
        digests = [str(d) for d in RowDigests(stacked).many(where, kinds)]
        records = [
            ident.record(digest, kind)
            for ident, digest, kind in zip(identities, digests, kinds)
        ]
        keys = [ident.key for ident in identities]
        return self._write(records, where, stacked, None, (keys, digests, list(kinds)))

    def _write(
        self,
        records: list[str],
        where: list[tuple[int, int]],
        stacked: dict[int, np.ndarray],
        times: Sequence[int] | None,
        fields: tuple[list[str], list[str], list[str]] | None = None,
    ) -> ShardIndex:
        """Write a shard; ``fields``: ``(keys, checksums, kinds)`` if known."""
        now = self.next_time()
        entries = np.empty((len(records), 3), dtype="<i8")
        entries[:, :2] = np.array(where, dtype="<i8").reshape(len(records), 2)
        entries[:, 2] = now if times is None else np.asarray(times, dtype="<i8")
        blob = shard_image(records, entries, stacked)
        path = join_location(self.root, shard_name(now))
        self.fs.makedirs(self.root)
        st = self.fs.write_bytes(path, blob)
        verified: list[bool | None] = [True] * len(records)
        if fields is None:
            index = ShardIndex(path, st, len(blob), "ok", records, entries, verified)
        else:
            keys, checksums, kinds = fields
            index = ShardIndex(
                path, st, len(blob), "ok", records, entries, verified, keys
            )
            index._fields = checksums, kinds
        with self.lock:
            self._drop(path)
            self._add(index)
        DATA.put(self._cache_key(path), st, stacked)
        return index

    # -- judging (status, clean, compact) ----------------------------------
    def judge(self, step: str | None) -> Iterator[tuple[str, str, int, Stamp | None]]:
        """``(path, status, size, stamp)`` of every shard and shard temporary.

        ``step`` None (a step whose fitted state is unknown) calls every
        readable shard ``unknown``.
        """
        with self.lock:
            self.refresh()
            valid = self._valid_entries(step) if step is not None else set()
            shards = dict(self.shards)  # without any that vanished meanwhile
            others = dict(self.others)
        items: list[tuple[str, str, int, Stamp | None]] = []
        for path, index in shards.items():
            if index.status != "ok":
                items.append((path, index.status, index.size, index.stamp))
            elif step is None:
                items.append((path, "unknown", index.size, index.stamp))
            elif any((path, p) in valid for p in range(len(index.records))):
                items.append((path, "valid", index.size, index.stamp))
            elif index.records and not any(index.verified):
                items.append((path, "corrupt", index.size, index.stamp))
            else:
                items.append((path, "stale", index.size, index.stamp))
        for path, (size, st) in others.items():
            name = (
                posixpath.basename(path)
                if not self.fs.local
                else (os.path.basename(path))
            )
            alive = _temporary_owner_alive(name)
            items.append((path, "writing" if alive else "temporary", size, st))
        yield from sorted(items)

    def _valid_entries(self, step: str) -> set[tuple[str, int]]:
        """``(shard, position)`` of each key's newest verified entry of ``step``."""
        for index in list(self.shards.values()):
            self.verify(index)
        valid: set[tuple[str, int]] = set()
        for refs in self.by_key.values():
            for _, path, position in refs:
                found = self.shards.get(path)
                if found is None or not found.verified[position]:
                    continue
                if _of_step(found.records[position], step):
                    valid.add((path, position))
                    break
        return valid

    def remove(self, path: str, st: Stamp | None) -> bool:
        """Remove a shard (or temporary) if its stamp is still ``st``."""
        current = self.fs.stamp(path)
        if current is None or (st is not None and current != st):
            return False
        self.fs.remove(path)
        with self.lock:
            self._drop(path)
        return True

    def compact(
        self,
        shard_size: int | None = DEFAULT_SHARD_SIZE,
        step: str | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> dict[str, Any]:
        """Merge small shards into full ones; drop what no step can use.

        Dropped: corrupt entries and exact copies of a newer entry; with
        ``step``, also every entry that is not this step's valid entry of its
        key (stale and superseded ones). A shard is rewritten when it holds
        any dropped entry, or when it is small: fewer than ``shard_size`` kept
        entries (if given) and a file of less than half ``shard_bytes``. New
        shards (split as the writer does, `split_points`) are written (each
        atomically) before the old ones are removed, so a reader always finds
        every kept entry; entries keep their times.
        """
        with self.lock:
            self.refresh()
            for index in list(self.shards.values()):
                self.verify(index)
            valid = self._valid_entries(step) if step is not None else None
            newest: dict[str, tuple[str, int]] = {}
            for refs in self.by_key.values():
                for _, path, position in refs:
                    found = self.shards.get(path)
                    if found is not None and found.verified[position]:
                        newest.setdefault(found.records[position], (path, position))
            shards = sorted(
                (i for i in self.shards.values() if i.status == "ok"),
                key=lambda i: i.path,
            )
        kept_of: dict[str, list[int]] = {}
        dropping: set[str] = set()
        for index in shards:
            kept = []
            for position, record in enumerate(index.records):
                if newest.get(record) != (index.path, position):
                    continue
                if valid is not None and (index.path, position) not in valid:
                    continue
                kept.append(position)
            kept_of[index.path] = kept
            if len(kept) < len(index.records):
                dropping.add(index.path)

        def full(index: ShardIndex) -> bool:
            if shard_size is not None and len(kept_of[index.path]) >= shard_size:
                return True
            return index.size >= shard_bytes // 2

        candidates = [i for i in shards if i.path in dropping or not full(i)]
        report: dict[str, Any] = {
            "shards": len(shards),
            "written": [],
            "removed": [],
            "kept": sum(len(kept_of[i.path]) for i in candidates),
            "dropped": sum(len(i.records) - len(kept_of[i.path]) for i in candidates),
        }
        if not dropping and len(candidates) < 2:
            report.update(kept=0, dropped=0)
            return report
        pending: list[tuple[str, np.ndarray, int]] = []
        done: list[ShardIndex] = []

        def flush(final: bool) -> None:
            ends = split_points([p.nbytes for _, p, _ in pending], *limits)
            if not final:
                ends = ends[:-1]  # the last shard may take more entries
            start = 0
            for end in ends:
                chunk = pending[start:end]
                start = end
                written = self.write(
                    [r for r, _, _ in chunk],
                    [p for _, p, _ in chunk],
                    [t for _, _, t in chunk],
                )
                report["written"].append(written.path)
            del pending[:start]

        limits = (shard_size, shard_bytes)

        for index in candidates:
            arrays = self._arrays(index) if kept_of[index.path] else {}
            if arrays is None:  # changed since judged: leave it alone
                continue
            for position in kept_of[index.path]:
                g, row, t = (int(v) for v in index.entries[position])
                payload = _payload(arrays, g, row)
                record = index.records[position]
                if not _checksum_ok(payload, record):  # changed under us
                    break
                pending.append((record, np.array(payload), t))
            else:
                done.append(index)
                flush(final=False)
        flush(final=True)
        for index in done:
            if self.remove(index.path, index.stamp):
                report["removed"].append(index.path)
        return report


_FOLDERS: dict[str, ShardFolder] = {}
_FOLDERS_LOCK = threading.Lock()


def shard_folder(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    fs: FileSystem | None = None,
) -> ShardFolder:
    """The `ShardFolder` of ``location`` in this process (one per folder)."""
    root = location_root(location)
    if fs is None:
        fs = filesystem(root, storage_options)
    key = f"{fs.token}|{normalize_location(root)}"
    with _FOLDERS_LOCK:
        folder = _FOLDERS.get(key)
        if folder is None:
            folder = ShardFolder(root, fs, storage_options)
            _FOLDERS[key] = folder
        return folder


def clear() -> None:
    """Forget every shard index and payload this process read (a new process)."""
    with _FOLDERS_LOCK:
        _FOLDERS.clear()
    DATA.clear()


def compact(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    shard_size: int | None = DEFAULT_SHARD_SIZE,
    step: str | None = None,
    shard_bytes: int | str = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Merge the small shards of a folder into fewer, full ones.

    Parameters
    ----------
    location : str or os.PathLike
        The ``features_dir`` of a step with ``layout="shards"`` (a local path
        or an fsspec URL).
    storage_options : dict, default=None
        fsspec options for a URL.
    shard_size : int, default=None
        At most this many entries per new shard (None: no limit); a shard with
        this many kept entries is full.
    step : str, default=None
        A step identity (`CheckpointWrapper.step_identity`): keep only that
        step's valid entries. Without it, every verified entry is kept (only
        corrupt entries and duplicates are dropped): use
        `CheckpointWrapper.compact_checkpoints` to drop stale entries too.
    shard_bytes : int or str, default=64 * 2**20
        At most this many payload bytes per new shard (at least one entry
        each); an int, or a str such as ``"64M"``. A shard file of at least
        half this size is full. Shards that are not full are merged.

    Returns
    -------
    report : dict
        ``shards`` (before), ``written`` and ``removed`` (paths), ``kept`` and
        ``dropped`` (entries of the merged shards).

    Notes
    -----
    New shards are written (each atomically) before the merged ones are
    removed: a reader that lists the folder at any moment finds every kept
    entry, and a crash leaves duplicates at worst (dropped by the next
    compaction). Shards that changed since they were read are left alone.
    """
    size, nbytes = shard_limits(shard_size, shard_bytes, "compact")
    return shard_folder(location, storage_options).compact(size, step, nbytes)


# ---------------------------------------------------------------------------
# lazy loading of one entry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLoader(CheckpointLoader):
    """Loads one entry of one shard; picklable (paths and options only).

    ``path`` is the shard, ``stamp`` its stamp when the entry was validated,
    ``group``/``row`` the entry, ``checksum``/``kind`` those of its record.
    A call returns the payload from this process's `DATA` while the shard's
    stamp is unchanged (one ``os.stat`` locally; on a store, shards are never
    rewritten); otherwise it reads the entry's dataset row and verifies its
    checksum. When the shard is gone (compacted) or changed, the same record
    is looked up in the folder's other shards; failing that,
    `CorruptCheckpointError`.
    """

    group: int = 0
    row: int = 0
    checksum: str = ""
    kind: str = "a"

    @classmethod
    def make(
        cls,
        path: str,
        identity: Identity,
        stamp: Stamp,
        storage_options: Mapping[str, Any] | None,
        entry: tuple[int, int, str, str],
    ) -> ShardLoader:
        """A loader, built without the frozen dataclass's per-field setattr.

        ``entry`` is ``(group, row, checksum, kind)``. One per output sample:
        this is on the hot path of every transform.
        """
        group, row, checksum, kind = entry
        loader = cls.__new__(cls)
        loader.__dict__.update(
            path=path,
            identity=identity,
            stamp=stamp,
            load_func=None,
            storage_options=storage_options,
            group=group,
            row=row,
            checksum=checksum,
            kind=kind,
        )
        return loader

    def __call__(self) -> Any:
        return hdf5.decode(self._payload(), self.kind)

    @staticmethod
    def stacked(loaders: Sequence[ShardLoader]) -> np.ndarray:
        """The arrays of many entries in one array, read a shard at a time.

        The checks are those of calling each loader: the first entry of each
        shard is loaded as a call does (read, verified, its shard kept in
        `DATA`); the others are served from the payloads kept under the stamp
        they were validated with, one fancy-indexed copy per shard group.
        Anything else (another stamp, another kind) loads entry by entry;
        values of different shapes or dtypes give ``np.stack`` of them all.
        """
        if not loaders:
            return np.empty((0,))
        first = loaders[0]()
        if not isinstance(first, np.ndarray):
            return np.stack([first] + [loader() for loader in loaders[1:]])
        out = np.empty((len(loaders), *first.shape), dtype=first.dtype)

        def put(i: int, value: Any) -> bool:
            if (
                not isinstance(value, np.ndarray)
                or value.shape != first.shape
                or value.dtype != first.dtype
            ):
                return False
            out[i] = value
            return True

        put(0, first)
        by_shard: dict[tuple[str, Stamp], list[int]] = {}
        for i, loader in enumerate(loaders[1:], 1):
            by_shard.setdefault((loader.path, loader.stamp), []).append(i)
        for (path, stamp), members in by_shard.items():
            head = loaders[members[0]]
            if not put(members[0], head()):  # reads and verifies the shard
                return np.stack([loader() for loader in loaders])
            cached = DATA.get(f"{head._fs().token}|{path}")
            rest = members[1:]
            kept = cached[1] if cached is not None and cached[0] == stamp else {}
            index = np.array(rest, dtype=np.int64)
            groups = np.array([loaders[i].group for i in rest], dtype=np.int64)
            rows = np.array([loaders[i].row for i in rest], dtype=np.int64)
            plain = np.array([loaders[i].kind == "a" for i in rest], dtype=bool)
            served = np.zeros(len(rest), dtype=bool)
            for g in np.unique(groups).tolist():
                array = kept.get(g)
                if (
                    array is None
                    or array.shape[1:] != first.shape
                    or array.dtype != first.dtype
                ):
                    continue
                mine = (groups == g) & plain & (rows >= 0) & (rows < len(array))
                out[index[mine]] = array[rows[mine]]
                served |= mine
            for i in index[~served].tolist():  # entry by entry, as a call
                if not put(i, loaders[i]()):
                    return np.stack([loader() for loader in loaders])
        return out

    def _fs(self) -> FileSystem:
        if "://" not in self.path:
            return LOCAL
        return filesystem(self.path, self.storage_options)

    def _payload(self) -> np.ndarray:
        fs = self._fs()
        cached = DATA.get(f"{fs.token}|{self.path}")
        if cached is not None:
            try:
                payload = np.array(_payload(cached[1], self.group, self.row))
            except (KeyError, ShardError):
                payload = None
            # Payloads kept under the stamp this entry was validated with are
            # the bytes it was validated from (a file written since has another
            # stamp), whatever became of the file since: no stat, no digest.
            if payload is not None and (
                cached[0] == self.stamp
                or _checksum_ok(payload, self.identity.record(self.checksum, self.kind))
            ):
                return payload
        record = self.identity.record(self.checksum, self.kind)
        payload = self._read_row(fs)
        if payload is not None:
            return payload
        root = fs.dirname(self.path)
        folder = shard_folder(root, self.storage_options, fs)
        found = folder.find_record(record)
        if found is not None:
            g, row = (int(v) for v in found.shard.entries[found.position, :2])
            arrays = folder._arrays(found.shard)
            if arrays is not None:
                payload = np.array(_payload(arrays, g, row))
                if _checksum_ok(payload, record):
                    return payload
        msg = (
            f"Checkpoint {self.identity.key!r} in shard {self.path!r} changed since "
            "it was written and is now missing or corrupt; transform the samples "
            "again to recompute it."
        )
        raise CorruptCheckpointError(msg)

    def _read_row(self, fs: FileSystem) -> np.ndarray | None:
        """The entry's payload read from the shard and verified; None if not.

        Locally a shard of at most `WHOLE_READ_BYTES` is read whole (one
        open: its other entries are usually loaded next, e.g. by the next
        step of a flow) and kept in `DATA` while its stamp is the one the
        entry was validated with; a larger shard gives one dataset row. From a
        store the whole object (one GET), whose payloads then serve the
        shard's other entries.
        """
        import h5py

        record = self.identity.record(self.checksum, self.kind)
        try:
            if fs.local and self.stamp.size <= WHOLE_READ_BYTES:
                with hdf5.H5_LOCK, h5py.File(self.path, "r") as f:
                    arrays = {int(g): d[()] for g, d in f["data"].items()}
                if LOCAL.stamp(self.path) == self.stamp:
                    DATA.put(f"{fs.token}|{self.path}", self.stamp, arrays)
                payload = np.array(_payload(arrays, self.group, self.row))
            elif fs.local:
                with hdf5.H5_LOCK, h5py.File(self.path, "r") as f:
                    payload = np.array(f[f"data/{self.group}"][self.row, ...])
            else:
                stamped = fs.read_stamped(self.path, self.stamp)
                if stamped is None:
                    return None
                folder = shard_folder(fs.dirname(self.path), self.storage_options, fs)
                index, stored = folder._index_of_bytes(self.path, *stamped)
                if index.status != "ok" or stored is None:
                    return None
                payload = np.array(_payload(stored, self.group, self.row))
        except (OSError, KeyError, ValueError, IndexError):
            return None
        return payload if _checksum_ok(payload, record) else None
