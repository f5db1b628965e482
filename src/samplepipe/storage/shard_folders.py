"""A folder of shards: the per-process key index, writing, judging, compaction.

See `samplepipe.storage.shards` for the shard format and the statuses.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ShardError as ShardError
from . import hdf5
from .files import Stamp
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
from .identity import Identity
from .shard_file import (
    _GONE,
    _READ_ATTEMPTS,
    DATA,
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SIZE,
    Found,
    RowDigests,
    ShardIndex,
    _checksum_ok,
    _of_step,
    _payload,
    _prefix,
    _read_data,
    _read_index,
    is_shard_name,
    is_shard_temporary,
    shard_image,
    shard_limits,
    shard_name,
    split_points,
    stack_payloads,
)


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
