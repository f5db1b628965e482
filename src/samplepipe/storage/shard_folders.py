"""A folder of shards: the per-process key index, writing, judging, compaction.

See `samplepipe.storage.shards` for the shard format and the statuses.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ShardError as ShardError
from . import hdf5, shard_index
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
from .identity import FORMAT_VERSION, Identity, Record
from .shard_compaction import compact_folder
from .shard_file import (
    _READ_ATTEMPTS,
    DATA,
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SIZE,
    RowDigests,
    _read_data,
    _read_index,
    _read_index_text,
    is_shard_name,
    is_shard_temporary,
    shard_image,
    shard_limits,
    shard_name,
    stack_payloads,
)
from .shard_index import (
    BAD,
    COLUMNS,
    GOOD,
    TEXTS,
    UNKNOWN,
    ByKey,
    Found,
    ShardIndex,
    TextBlob,
    _Columns,
)
from .status import Status

_NO_ENTRIES = np.zeros((0, 3), "<i8")
_NO_DIGEST = bytes(16)


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
        self._slots: list[ShardIndex | None] = []  # indexed shards, by slot
        self._slot_of: dict[str, int] = {}
        self._live = 0  # entries of the indexed shards
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
                return ShardIndex(path, Stamp(size, 0, 0, 0), size, Status.UNKNOWN)
            for _ in range(_READ_ATTEMPTS):
                records: list[str] = []
                entries = _NO_ENTRIES
                try:
                    with hdf5.H5_LOCK, h5py.File(path, "r") as f:
                        records, entries = _read_index(f)
                    status = Status.OK
                except FileNotFoundError:
                    return None
                except LookupError:
                    status = Status.UNKNOWN
                except (OSError, ShardError):
                    status = Status.CORRUPT
                after = LOCAL.stamp(path)
                if after is None:
                    return None
                if after == listed:
                    if status != Status.OK:
                        return ShardIndex(path, after, size, status)
                    return ShardIndex.from_records(path, after, size, records, entries)
                listed = after  # changed while read: read it again
            return ShardIndex(path, listed, size, Status.CORRUPT)
        try:
            stamped = self.fs.read_stamped(path, listed)
        except ChangedWhileReading:
            st = self.fs.stamp(path)
            if st is None:
                return None
            return ShardIndex(path, st, size, Status.CORRUPT)
        if stamped is None:
            return None
        blob, st = stamped
        return self._index_of_bytes(path, blob, st)[0]

    def _index_of_bytes(
        self, path: str, blob: bytes, st: Stamp
    ) -> tuple[ShardIndex, dict[int, np.ndarray] | None]:
        """Index and payloads of a whole shard read from a store.

        Every entry is verified at once (the payloads are at hand) and the
        payloads are kept in `DATA`, the record texts in `TEXTS`.
        """
        try:
            with hdf5.H5_LOCK, hdf5._open_image(blob) as f:
                text, entries = _read_index_text(f)
                arrays = _read_data(f, entries)
        except LookupError:
            return ShardIndex(path, st, len(blob), Status.UNKNOWN), None
        except (OSError, ValueError):  # ShardError is a ValueError
            return ShardIndex(path, st, len(blob), Status.CORRUPT), None
        texts = TextBlob(text)
        index = ShardIndex.from_records(path, st, len(blob), list(texts), entries)
        index.reader = self._texts
        TEXTS.put(self._cache_key(path), st, texts)
        self._verify_all(index, arrays)
        DATA.put(self._cache_key(path), st, arrays)
        return index, arrays

    def _texts(self, index: ShardIndex) -> TextBlob | None:
        """The record texts of a shard as of its index's stamp; None if changed."""
        key = self._cache_key(index.path)
        cached = TEXTS.get(key)
        if cached is not None and cached[0] == index.stamp:
            return cached[1]
        texts: TextBlob | None = None
        if self.fs.local:
            import h5py

            try:
                with hdf5.H5_LOCK, h5py.File(index.path, "r") as f:
                    text, _ = _read_index_text(f)
                if LOCAL.stamp(index.path) == index.stamp:
                    texts = TextBlob(text)
            except (OSError, LookupError, ShardError):
                texts = None
        else:
            try:
                stamped = self.fs.read_stamped(index.path, index.stamp)
                if stamped is not None and stamped[1] == index.stamp:
                    with hdf5.H5_LOCK, hdf5._open_image(stamped[0]) as f:
                        texts = TextBlob(_read_index_text(f)[0])
            except (OSError, LookupError, ValueError, ChangedWhileReading):
                texts = None
        if texts is None or len(texts) != len(index):
            return None
        TEXTS.put(key, index.stamp, texts)
        return texts

    def _add(self, index: ShardIndex) -> None:
        self.shards[index.path] = index
        if index.status != Status.OK:
            return
        index.reader = self._texts
        index.loader = self._columns_of
        if not len(index):
            return
        self.max_time = max(self.max_time, index.max_time)
        slot = len(self._slots)
        self._slots.append(index)
        self._slot_of[index.path] = slot
        self._live += len(index)
        cols = index._cols
        if cols is not None:
            COLUMNS.hold(index, cols.nbytes)

    def _drop(self, path: str) -> None:
        index = self.shards.pop(path, None)
        if index is not None:
            COLUMNS.forget(index)
        DATA.forget(self._cache_key(path))
        TEXTS.forget(self._cache_key(path))
        slot = self._slot_of.pop(path, None)
        if slot is None:
            return
        self._live -= len(self._slots[slot] or ())
        self._slots[slot] = None
        if (
            len(self._slots) > 64
            and self._slot_of
            and len(self._slot_of) * 2 < len(self._slots)
        ):  # mostly dropped: renumber (a lookup keeps its own slot -> shard map)
            self._slots = [i for i in self._slots if i is not None]
            self._slot_of = {
                i.path: s for s, i in enumerate(self._slots) if i is not None
            }

    def _columns_of(self, index: ShardIndex) -> _Columns | None:
        """The per-entry arrays of an indexed shard, read again; None if it changed."""
        try:
            again = self._read_index(index.path, index.size, index.stamp)
        except OSError:  # a store that failed to answer: as if changed
            return None
        if again is None or again.status != Status.OK or again.stamp != index.stamp:
            return None
        return again._cols

    # -- verifying payloads ------------------------------------------------
    def _verify_all(self, index: ShardIndex, arrays: Mapping[int, np.ndarray]) -> None:
        """Check every entry's payload against the checksum of its record."""
        where = index.entries[:, :2].tolist()
        digests = RowDigests(arrays).many_raw(where, index.kind_list())
        raw = np.frombuffer(
            b"".join(_NO_DIGEST if d is None else d for d in digests), dtype="V16"
        )
        good = raw == index.checksums
        for position in index.odd:
            good[position] = False
        index.verified = good.astype(np.int8)

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
            return arrays if again.status == Status.OK else None
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
        if index.status != Status.OK or not (index.verified == UNKNOWN).any():
            return True
        try:
            arrays = self._arrays(index)
            if arrays is not None:
                self._verify_all(index, arrays)
                return True
        except (OSError, ShardError):  # ChangedWhileReading too: the index is gone
            pass
        index.verified = np.zeros(len(index), dtype=np.int8)
        with self.lock:
            if self.shards.get(index.path) is index:
                self._drop(index.path)
        return False

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

    def _candidates(
        self, digests: np.ndarray, keys: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
        """`shard_index.candidates` in the shards this folder indexed."""
        live = [(s, i) for s, i in enumerate(self._slots) if i is not None]
        return shard_index.candidates(live, digests, keys)

    @staticmethod
    def _gather(
        held: Mapping[int, Any], slots: np.ndarray, positions: np.ndarray, name: str
    ) -> Any:
        """``getattr(held[slot], name)[position]`` of each candidate."""
        dtype = next(getattr(i, name).dtype for i in held.values())
        out = np.zeros(len(slots), dtype=dtype)
        for s in np.unique(slots).tolist():
            mine = slots == s
            out[mine] = getattr(held[s], name)[positions[mine]]
        return out

    def _find_once(self, wanted: Sequence[Identity]) -> tuple[list[Found | str], bool]:
        results: list[Found | str] = [Status.MISSING] * len(wanted)
        if not wanted or not self._live:
            return results, True
        names = [i.key for i in wanted]
        keys = shard_index.key_digests(names)
        try:
            w, slots, positions, _, _, cols = self._candidates(keys, names)
        except ChangedWhileReading:
            return results, False  # read again from a new listing
        if not len(w):
            return results, True
        settled = True
        # the shards as found: one dropped meanwhile is corrupt
        held = {s: self._slots[s] for s in cols}
        same_key = self._gather(cols, slots, positions, "key_checks") == keys[w, 1]
        match = same_key & shard_index.same_step(cols, wanted, w, slots, positions)
        inputs = shard_index.inputs_digests([i.inputs for i in wanted])
        match[match] = (
            self._gather(cols, slots[match], positions[match], "inputs")
            == inputs[w[match]]
        )
        mw, ms, mp = w[match], slots[match], positions[match]
        while True:  # verify, newest first, the shards each answer depends on
            verified = self._gather(held, ms, mp, "verified")
            decided = np.flatnonzero(verified != BAD)
            md = mw[decided]  # grouped by wanted index: the first of each run
            starts = np.flatnonzero(np.r_[True, md[1:] != md[:-1]]) if len(md) else md
            first = decided[starts]
            pending = np.unique(ms[first[verified[first] == UNKNOWN]]).tolist()
            if not pending:
                break
            for s in pending:
                index = held[s]
                assert index is not None
                if self.verify(index) is False:  # changed: all BAD, search again
                    settled = False
        for i in np.setdiff1d(mw, mw[first]).tolist():
            results[i] = Status.CORRUPT  # only entries failing their checksum
        new = tuple.__new__  # a Found, without NamedTuple's slower __new__
        for i, s, p in zip(mw[first].tolist(), ms[first].tolist(), mp[first].tolist()):
            results[i] = new(Found, (held[s], p))
        # an entry of another identity: stale if its real key is the wanted one
        other = np.flatnonzero(~np.isin(w, mw) & same_key)
        for j in other.tolist():
            i = int(w[j])
            if results[i] != Status.MISSING:
                continue
            index = held.get(int(slots[j]))
            record = None if index is None else index.record(int(positions[j]))
            if record is None:
                settled = False
                results[i] = Status.STALE  # as before: its shard is being replaced
            elif Record.key_of(record) == wanted[i].key:
                results[i] = Status.STALE
        return results, settled

    def refs(self, key: str) -> list[tuple[int, str, int]]:
        """``(time, shard path, position)`` of every entry of ``key``, newest first.

        Confirmed against the records read from the shards.
        """
        with self.lock:
            digests = shard_index.key_digests([key])
            try:
                _, slots, positions, times, _, _ = self._candidates(digests, [key])
            except ChangedWhileReading:
                return []  # a shard changed: its entries are not known now
            found = []
            for s, p, t in zip(slots.tolist(), positions.tolist(), times.tolist()):
                index = self._slots[s]
                record = None if index is None else index.record(p)
                if index is not None and record is not None:
                    if Record.key_of(record) == key:
                        found.append((t, index.path, p))
            return found

    @property
    def by_key(self) -> ByKey:
        """``key -> refs`` (see `refs`), looked up on demand."""
        return ByKey(self)

    def find_record(self, record: str) -> Found | None:
        """The newest verified entry holding exactly ``record``."""
        key = Record.key_of(record)
        with self.lock:
            self.refresh()
            for _, path, position in self.refs(key):
                index = self.shards.get(path)
                if index is None or index.record(position) != record:
                    continue
                self.verify(index)
                if index.verified[position] == GOOD:
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
        return self._write(records, where, stacked, times)

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
            Record(str(i.format), i.step, i.inputs, digest, kind, i.key)
            for i, digest, kind in zip(identities, digests, kinds)
        ]
        return self._write(records, where, stacked, None)

    def _write(
        self,
        records: Sequence[Record | str],
        where: list[tuple[int, int]],
        stacked: dict[int, np.ndarray],
        times: Sequence[int] | None,
    ) -> ShardIndex:
        """Write a shard of these records (texts, or `Record` fields)."""
        now = self.next_time()
        entries = np.empty((len(records), 3), dtype="<i8")
        entries[:, :2] = np.array(where, dtype="<i8").reshape(len(records), 2)
        entries[:, 2] = now if times is None else np.asarray(times, dtype="<i8")
        texts = [r if isinstance(r, str) else r.text() for r in records]
        blob = shard_image(texts, entries, stacked)
        del texts
        path = join_location(self.root, shard_name(now))
        self.fs.makedirs(self.root)
        st = self.fs.write_bytes(path, blob)
        index = ShardIndex.from_records(path, st, len(blob), records, entries)
        index.verified[:] = GOOD
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
            valid = self._valid_entries(step) if step is not None else {}
            shards = dict(self.shards)  # without any that vanished meanwhile
            others = dict(self.others)
        items: list[tuple[str, str, int, Stamp | None]] = []
        for path, index in shards.items():
            if index.status != Status.OK:
                items.append((path, index.status, index.size, index.stamp))
            elif step is None:
                items.append((path, Status.UNKNOWN, index.size, index.stamp))
            elif path in valid and valid[path].any():
                items.append((path, Status.VALID, index.size, index.stamp))
            elif len(index) and not (index.verified == GOOD).any():
                items.append((path, Status.CORRUPT, index.size, index.stamp))
            else:
                items.append((path, Status.STALE, index.size, index.stamp))
        for path, (size, st) in others.items():
            name = (
                posixpath.basename(path)
                if not self.fs.local
                else (os.path.basename(path))
            )
            alive = _temporary_owner_alive(name)
            items.append(
                (path, Status.WRITING if alive else Status.TEMPORARY, size, st)
            )
        yield from sorted(items)

    def _valid_entries(self, step: str) -> dict[str, np.ndarray]:
        """Per shard, whether each entry is its key's newest verified ``step`` one."""
        for index in list(self.shards.values()):
            self.verify(index)
        prefix = f"{FORMAT_VERSION}:{step}"
        return self._newest(
            lambda index: (index.verified == GOOD) & index.of_step(prefix),
            Record.key_of,
        )

    def _newest(
        self,
        select: Callable[[ShardIndex], np.ndarray],
        same: Callable[[str], str],
    ) -> dict[str, np.ndarray]:
        """Per shard, whether each entry is the newest selected one of its group.

        Entries where ``select`` is True are grouped by key digest and, where a
        digest has more than one, by ``same(record)`` of the records read from
        the shards (an entry whose shard changed meanwhile is a group alone).
        Newest: the latest time, then the later shard path and position.
        """
        live = {s: i for s, i in enumerate(self._slots) if i is not None}
        parts: list[tuple[np.ndarray, ...]] = []
        for rank, s in enumerate(sorted(live, key=lambda s: live[s].path)):
            index = live[s]
            try:
                cols = index.columns()
                mine = np.flatnonzero(select(index))
            except ChangedWhileReading:  # gone since listed: left out, as if not listed
                del live[s]
                self._drop(index.path)
                continue
            digests = np.empty(len(index), "<u8")
            digests[cols.positions] = cols.lookup  # by position
            parts.append(
                (
                    digests[mine],
                    np.full(len(mine), s, "<i4"),
                    mine.astype("<i4"),
                    cols.entries[mine, 2],
                    np.full(len(mine), rank, "<i8"),
                )
            )
        chosen = {index.path: np.zeros(len(index), bool) for index in live.values()}
        if not parts:
            return chosen
        d, sl, ps, times, ranks = (np.concatenate(c) for c in zip(*parts))
        order = np.lexsort((-ps, -ranks, -times, d))
        d, sl, ps = d[order], sl[order], ps[order]
        if not len(d):
            return chosen
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        sizes = np.diff(np.r_[starts, len(d)])
        single = starts[sizes == 1]
        picked = [single]
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
            seen: set[str] = set()
            for j in range(start, start + size):
                record = live[int(sl[j])].record(int(ps[j]))
                label = same(record) if record is not None else None
                if label is None or label not in seen:
                    picked.append(np.array([j]))
                    if label is not None:
                        seen.add(label)
        at = np.concatenate(picked)
        for s, index in live.items():
            mine = at[sl[at] == s]
            chosen[index.path][ps[mine]] = True
        return chosen

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
        return compact_folder(self, shard_size, step, shard_bytes)


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
    TEXTS.clear()
    COLUMNS.clear()


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
