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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ShardError as ShardError
from . import hdf5
from .checkpoints import CheckpointLoader, CorruptCheckpointError
from .files import Stamp
from .fs import (
    LOCAL,
    FileSystem,
    filesystem,
)
from .identity import Identity
from .shard_file import (
    DATA,
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SIZE,
    INDEX_CHECKSUM_ATTRIBUTE,
    SHARD_ATTRIBUTE,
    SHARD_FORMAT,
    Found,
    RowDigests,
    ShardData,
    ShardIndex,
    _checksum_ok,
    _payload,
    is_shard_name,
    is_shard_temporary,
    shard_image,
    shard_limits,
    shard_name,
    split_points,
    stack_payloads,
)
from .shard_folders import ShardFolder, clear, compact, shard_folder
from .status import Status

__all__ = [
    "DATA",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_SIZE",
    "INDEX_CHECKSUM_ATTRIBUTE",
    "SHARD_ATTRIBUTE",
    "SHARD_FORMAT",
    "WHOLE_READ_BYTES",
    "Found",
    "RowDigests",
    "ShardData",
    "ShardError",
    "ShardFolder",
    "ShardIndex",
    "ShardLoader",
    "clear",
    "compact",
    "is_shard_name",
    "is_shard_temporary",
    "shard_folder",
    "shard_image",
    "shard_limits",
    "shard_name",
    "split_points",
    "stack_payloads",
]

# A local shard up to this size is read whole when one of its entries misses
# `DATA` (one open instead of one per entry); a larger one, row by row. As
# large as `DATA` keeps: shards of the default 64 MiB are read whole.
WHOLE_READ_BYTES = 256 << 20


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
                if index.status != Status.OK or stored is None:
                    return None
                payload = np.array(_payload(stored, self.group, self.row))
        except (OSError, KeyError, ValueError, IndexError):
            return None
        return payload if _checksum_ok(payload, record) else None
