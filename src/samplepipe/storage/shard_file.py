"""The shard file format: names, limits, images and indexes of shard files.

One shard is an HDF5 file written once (see `samplepipe.storage.shards` for
its layout). This module makes and reads shard files; `shard_folders` keeps
the per-process index of a folder of them; `shards` is the public face.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ShardError as ShardError
from . import hdf5
from .files import HOST_TAG, TMP_SUFFIX, is_temporary_file
from .identity import Record
from .shard_index import Found as Found
from .shard_index import ShardIndex as ShardIndex
from .shard_index import StampedLRU

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
        return [None if d is None else d.hex() for d in self.many_raw(where, kinds)]

    def many_raw(
        self, where: Sequence[Sequence[int]], kinds: Sequence[str]
    ) -> list[bytes | None]:
        """`many` as the digests' 16 bytes (None: no such entry)."""
        digests: list[bytes | None] = []
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
            append(h.digest())
        return digests


def _read_index(f: Any) -> tuple[list[str], np.ndarray]:
    """``(records, entries)`` of an open shard; `ShardError` if malformed."""
    text, entries = _read_index_text(f)
    return (text.decode("utf-8", "surrogatepass").split("\n") if text else []), entries


def _read_index_text(f: Any) -> tuple[bytes, np.ndarray]:
    """``(records as one UTF-8 text, entries)``; `ShardError` if malformed."""
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
    count = text.count(b"\n") + 1 if text else 0
    if entries.ndim != 2 or entries.shape != (count, 3):
        raise ShardError("the shard index is malformed")
    return text, entries


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
    r = Record.fields(record)
    return r is not None and hdf5.checksum(payload, r.kind) == r.checksum


# ---------------------------------------------------------------------------
# payloads read in this process
# ---------------------------------------------------------------------------
class ShardData(StampedLRU[dict[int, np.ndarray]]):
    """A bounded LRU of shard payloads: ``(store, path) -> (stamp, arrays)``.

    Shards are read whole when they are validated; lazy samples then load
    from here instead of opening the file once per sample. ``maxbytes`` bounds
    the memory (a shard larger than it is never kept).
    """

    def __init__(self, maxbytes: int = 128 << 20) -> None:
        super().__init__(maxbytes)

    def size(self, value: dict[int, np.ndarray]) -> int:
        return sum(a.nbytes for a in value.values())


DATA = ShardData()
