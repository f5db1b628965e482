"""The in-memory index of shards: fixed-width arrays, a few dozen bytes an entry.

A shard's records (`samplepipe.storage.identity.Record` text) are read from
its file when the shard is indexed, reduced to arrays and dropped: per entry
``(group, row, time)`` (24 B), its inputs (16 B, `inputs_digests`), a key
check (8 B), its payload checksum (16 B), a kind and a ``format:step`` code
(1 B each, into per-shard tables) and whether its payload was verified (1 B).
The folder maps keys to entries through 8-byte key digests in sorted runs
(`KeyRuns`, 16 B an entry). The record text itself is read back from the
shard on demand (`ShardIndex.record`), through a bounded cache (`TEXTS`).

What a digest decides, and what confirms it:

* column 0 of a key's 16-byte BLAKE2b digest (`key_digests`) only finds
  candidate entries; column 1, held per entry, confirms the key (a 64-bit
  collision of column 0 alone, e.g. forged, finds nothing);
* an entry is the wanted checkpoint when its key is confirmed so, its
  ``format:step`` is the wanted one (exact) and so are its inputs (exact for
  the 32-hex-digit digests samplepipe makes, else their 128-bit digest);
* that an entry of *another* identity has the wanted key (``stale`` rather
  than ``missing``), or that an entry holds exactly a given record, is
  confirmed against the record text read from the shard.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar, overload

import numpy as np

from .files import Stamp
from .identity import Record
from .status import Status

V = TypeVar("V")

_EMPTY_ENTRIES = np.zeros((0, 3), "<i8")
_NO_CHECKSUM = bytes(16)
_HEX = frozenset("0123456789abcdef")
UNKNOWN, BAD, GOOD = -1, 0, 1  # values of ShardIndex.verified


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def key_digests(keys: Sequence[str]) -> np.ndarray:
    """16-byte BLAKE2b digests of keys, as ``(n, 2) uint64``.

    Column 0 finds candidate entries (`KeyRuns`); column 1 confirms them.
    """
    blake = hashlib.blake2b
    joined = b"".join(
        [
            blake(k.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            for k in keys
        ]
    )
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 2)


def inputs_digests(values: Sequence[str]) -> np.ndarray:
    """Inputs as 16 bytes each (``V16``): a 32-hex-digit digest as its bytes.

    Any other text is hashed (BLAKE2b, a zero byte first): equal only to
    itself, up to a 128-bit collision.
    """
    if values and all(len(text) == 32 for text in values):
        joined = "".join(values)  # the common case: hex digests, at once
        try:
            raw = bytes.fromhex(joined)
        except ValueError:
            raw = b""
        if raw.hex() == joined:
            return np.frombuffer(raw, dtype="V16")
    blake = hashlib.blake2b
    fromhex = bytes.fromhex
    out: list[bytes] = []
    append = out.append
    for text in values:
        if len(text) == 32:
            try:
                raw = fromhex(text)
            except ValueError:
                pass
            else:
                if raw.hex() == text:
                    append(raw)
                    continue
        encoded = b"\0" + text.encode("utf-8", "surrogatepass")
        append(blake(encoded, digest_size=16).digest())
    return np.frombuffer(b"".join(out), dtype="V16")


def _codes(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint8 if max(values, default=0) < 256 else "<u4")


class ShardIndex:
    """The index of one shard file as of one stamp, held as arrays.

    ``status`` is ``ok``, ``corrupt`` (unreadable, or a broken index) or
    ``unknown`` (readable HDF5 that samplepipe did not write). ``verified``
    holds per entry ``-1`` (not checked yet), ``0`` (its payload fails its
    checksum) or ``1`` (verified). ``records`` reads the record texts back
    from the shard (through `TEXTS`); `record` reads one.

    Build one with `from_records`; a status alone makes an empty index.
    """

    def __init__(
        self,
        path: str,
        stamp: Stamp,
        size: int,
        status: str = Status.OK,
        entries: np.ndarray | None = None,
    ) -> None:
        self.path = path
        self.stamp = stamp
        self.size = size
        self.status = status
        self.entries = _EMPTY_ENTRIES if entries is None else entries
        n = len(self.entries)
        self.verified = np.full(n, UNKNOWN, dtype=np.int8)
        self.inputs = np.zeros(n, dtype="V16")  # see `inputs_digests`
        self.key_checks = np.zeros(n, dtype="<u8")  # column 1 of `key_digests`
        self.checksums = np.zeros(n, dtype="V16")
        self.kind_codes = np.zeros(n, dtype=np.uint8)
        self.kinds: tuple[str, ...] = ("",)
        self.step_codes = np.zeros(n, dtype=np.uint8)
        self.steps: tuple[str, ...] = ("",)  # "format:step"; "" if malformed
        self.odd: dict[int, str] = {}  # checksums that are not 32 hex digits
        self.reader: Callable[[ShardIndex], TextBlob | None] | None = None
        self.new_keys: np.ndarray | None = None  # key digests, until indexed
        self._views: tuple[Any, Any, Any] | None = None

    @classmethod
    def from_records(
        cls,
        path: str,
        stamp: Stamp,
        size: int,
        records: Sequence[Record | str],
        entries: np.ndarray,
    ) -> ShardIndex:
        """The index of an ``ok`` shard of these records (a str: its text).

        Texts are split with `Record.fields`; one that is not a record keeps
        its whole text as its key and matches no identity.
        """
        index = cls(path, stamp, size, Status.OK, np.ascontiguousarray(entries, "<i8"))
        keys: list[str] = []
        inputs: list[str] = []
        sums: list[bytes] = []
        kind_of: dict[str, int] = {"": 0}
        step_of: dict[str, int] = {"": 0}
        kinds: list[int] = []
        steps: list[int] = []
        odd = index.odd
        for position, item in enumerate(records):
            r = Record.fields(item) if isinstance(item, str) else item
            if r is None:
                assert isinstance(item, str)
                keys.append(Record.key_of(item))
                inputs.append("")  # step code 0: matches no identity
                sums.append(_NO_CHECKSUM)
                odd[position] = ""
                kinds.append(0)
                steps.append(0)
                continue
            keys.append(r.key)
            inputs.append(r.inputs)
            checksum = r.checksum
            if len(checksum) == 32 and _HEX.issuperset(checksum):
                sums.append(bytes.fromhex(checksum))
            else:
                sums.append(_NO_CHECKSUM)
                odd[position] = checksum
            kinds.append(kind_of.setdefault(r.kind, len(kind_of)))
            steps.append(step_of.setdefault(f"{r.format}:{r.step}", len(step_of)))
        n = len(keys)
        if n != len(index.entries):
            msg = f"{n} records for {len(index.entries)} entries"
            raise ValueError(msg)
        index.inputs = inputs_digests(inputs).copy()
        index.checksums = np.frombuffer(b"".join(sums), dtype="V16").copy()
        index.kind_codes = _codes(kinds)
        index.kinds = tuple(kind_of)
        index.step_codes = _codes(steps)
        index.steps = tuple(step_of)
        digests = key_digests(keys)
        index.key_checks = digests[:, 1].copy()
        index.new_keys = digests[:, 0].copy()
        return index

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ShardIndex({self.path!r}, {self.status!r}, {len(self)} entries)"

    # -- per entry -----------------------------------------------------------
    def _make_views(self) -> tuple[Any, Any, Any]:
        if self._views is None:
            flat = np.ascontiguousarray(self.entries, "<i8").data.cast("B")
            self._views = (
                _Checksums(self),
                _Kinds(self),
                _Locations(flat.cast("q")),
            )
        return self._views

    def fields(self) -> tuple[Sequence[str], Sequence[str]]:
        """``(checksums, kinds)`` of the entries' records ("" if malformed)."""
        checksums, kinds, _ = self._make_views()
        return checksums, kinds

    def locations(self) -> Sequence[list[int]]:
        """``[group, row]`` of each entry."""
        return self._make_views()[2]

    def entry(self, position: int) -> tuple[int, int, str, str]:
        """``(group, row, checksum, kind)`` of one entry (see `ShardLoader`)."""
        checksums, kinds, locations = self._make_views()
        group, row = locations[position]
        return group, row, checksums[position], kinds[position]

    def checksum_list(self) -> list[str]:
        """Every entry's checksum as text."""
        checksums = self.fields()[0]
        return [checksums[i] for i in range(len(self))]

    def kind_list(self) -> list[str]:
        """Every entry's kind."""
        kinds = self.kinds
        return [kinds[c] for c in self.kind_codes.tolist()]

    def of_step(self, step_prefix: str) -> np.ndarray:
        """Whether each entry's record starts with ``format:step`` as given."""
        return self.step_codes == self.step_code(step_prefix)

    def step_code(self, step_prefix: str) -> int:
        """The code of ``format:step`` in `step_codes`; -1 if no entry has it."""
        try:
            return self.steps.index(step_prefix) if step_prefix else -1
        except ValueError:
            return -1

    # -- the record texts, read from the shard -------------------------------
    def texts(self) -> TextBlob | None:
        """The shard's record texts as of this stamp; None if it changed."""
        if self.reader is None or self.status != Status.OK:
            return None
        return self.reader(self)

    def record(self, position: int) -> str | None:
        """The record of one entry, read from the shard; None if it changed."""
        blob = self.texts()
        return None if blob is None else blob[position]

    @property
    def records(self) -> Sequence[str]:
        """Every record, read from the shard (none when it changed or is not ok).

        A `TextBlob`: indexing and ``len`` cost O(1), not a list of them all.
        """
        blob = self.texts()
        return _NO_TEXTS if blob is None else blob

    @property
    def keys(self) -> list[str]:
        """Every entry's key, read from the shard."""
        return [Record.key_of(r) for r in self.records]


class _Checksums(Sequence[str]):
    def __init__(self, index: ShardIndex) -> None:
        self.odd = index.odd
        self.raw = index.checksums.data.cast("B")
        self.n = len(index)

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.odd and i in self.odd:
            return self.odd[i]
        return self.raw[16 * i : 16 * i + 16].hex()


class _Kinds(Sequence[str]):
    def __init__(self, index: ShardIndex) -> None:
        self.kinds = index.kinds
        self.codes = index.kind_codes

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.kinds[c] for c in self.codes[i].tolist()]
        return self.kinds[self.codes.item(i)]


class _Locations(Sequence[list[int]]):
    def __init__(self, flat: memoryview) -> None:
        self.flat = flat
        self.n = len(flat) // 3

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> list[int]: ...
    @overload
    def __getitem__(self, i: slice) -> list[list[int]]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return [self.flat[3 * i], self.flat[3 * i + 1]]


class TextBlob(Sequence[str]):
    """A shard's record texts: one UTF-8 blob and where each record ends."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        if text:
            newlines = np.flatnonzero(np.frombuffer(text, np.uint8) == 10)
            self.ends = np.append(newlines, len(text)).astype("<i8")
        else:
            self.ends = np.zeros(0, "<i8")
        self.nbytes = len(text) + self.ends.nbytes

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.ends)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        start = int(self.ends[i - 1]) + 1 if i else 0
        end = int(self.ends[i])
        return self.text[start:end].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        if self.text:
            yield from self.text.decode("utf-8", "surrogatepass").split("\n")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextBlob):
            return self.text == other.text
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, as a list


_NO_TEXTS = TextBlob(b"")


class Found(NamedTuple):
    """Where a valid entry is: its shard and position."""

    shard: ShardIndex
    position: int

    @property
    def record(self) -> str:
        """The entry's record, read from its shard ("" if it changed since)."""
        return self.shard.record(self.position) or ""


class KeyRuns:
    """Key digests of a folder's entries with their (slot, position): 16 B each.

    Sorted runs merged like a binary counter (a log-structured table, as
    `samplepipe.sources` keeps the keys of a source): adding a shard and
    looking a batch of keys up cost O(b log N). Entries of removed shards stay
    until `purge` filters them out.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(r[0]) for r in self.runs)

    def add(self, digests: np.ndarray, slot: int) -> None:
        """Add one shard's key digests (entry i at position i)."""
        if not len(digests):
            return
        order = np.argsort(digests, kind="stable")
        slots = np.full(len(digests), slot, dtype="<i4")
        self.runs.append((digests[order], slots, order.astype("<i4")))
        self._merge()

    def _merge(self) -> None:
        runs = self.runs
        while len(runs) > 1 and len(runs[-2][0]) <= len(runs[-1][0]):
            (d1, s1, p1), (d2, s2, p2) = runs[-2], runs[-1]
            d = np.concatenate([d1, d2])
            by = np.argsort(d, kind="stable")
            runs[-2:] = [
                (d[by], np.concatenate([s1, s2])[by], np.concatenate([p1, p2])[by])
            ]

    def purge(self, alive: np.ndarray) -> None:
        """Keep only the entries of slots where ``alive`` (bool by slot) is True."""
        digests, slots, positions = self.all()
        keep = alive[slots]
        by = np.argsort(digests[keep], kind="stable")
        self.runs = []
        if by.size:
            self.runs.append((digests[keep][by], slots[keep][by], positions[keep][by]))

    def all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(digests, slots, positions)`` of every entry (not sorted overall)."""
        if not self.runs:
            return np.zeros(0, "<u8"), np.zeros(0, "<i4"), np.zeros(0, "<i4")
        return (
            np.concatenate([r[0] for r in self.runs]),
            np.concatenate([r[1] for r in self.runs]),
            np.concatenate([r[2] for r in self.runs]),
        )

    def lookup(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(wanted index, slot, position)`` of every entry of a wanted digest."""
        found_w, found_s, found_p = [], [], []
        by = np.argsort(wanted)  # sorted needles: searches walk the run in order
        needles = wanted[by]
        for digests, slots, positions in self.runs:
            lo = np.searchsorted(digests, needles, "left")
            hi = np.searchsorted(digests, needles, "right")
            count = hi - lo
            total = int(count.sum())
            if not total:
                continue
            w = np.repeat(by, count)
            starts = np.repeat(lo - (np.cumsum(count) - count), count)
            at = starts + np.arange(total)
            found_w.append(w)
            found_s.append(slots[at])
            found_p.append(positions[at])
        if not found_w:
            empty = np.zeros(0, "<i8")
            return empty, empty.astype("<i4"), empty.astype("<i4")
        return (
            np.concatenate(found_w),
            np.concatenate(found_s),
            np.concatenate(found_p),
        )


class ByKey:
    """A folder's ``key -> [(time, shard path, position)]``, newest first."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def get(self, key: str, default: Any = None) -> list[tuple[int, str, int]] | Any:
        return self.folder.refs(key) or default

    def __getitem__(self, key: str) -> list[tuple[int, str, int]]:
        refs = self.folder.refs(key)
        if not refs:
            raise KeyError(key)
        return refs

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.folder.refs(key))


class StampedLRU(Generic[V]):
    """A bounded, thread-safe LRU of ``key -> (stamp, value)``, sized in bytes.

    ``maxbytes`` bounds the values' total size (`size` of each); a value
    larger than it is never kept. The shards' payloads (`shard_file.DATA`)
    and record texts (`TEXTS`) are the two of them.
    """

    def __init__(self, maxbytes: int) -> None:
        self.maxbytes = maxbytes
        self._items: OrderedDict[str, tuple[Stamp, V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def size(self, value: V) -> int:
        """Bytes held by ``value``."""
        raise NotImplementedError

    def put(self, key: str, st: Stamp, value: V) -> None:
        size = self.size(value)
        with self._lock:
            self._pop(key)
            if size > self.maxbytes:
                return
            self._items[key] = (st, value, size)
            self._bytes += size
            while self._bytes > self.maxbytes:
                _, (_, _, old) = self._items.popitem(last=False)
                self._bytes -= old

    def get(self, key: str) -> tuple[Stamp, V] | None:
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


class _Texts(StampedLRU[TextBlob]):
    """A bounded LRU of shards' record texts: ``key -> (stamp, TextBlob)``."""

    def __init__(self, maxbytes: int = 64 << 20) -> None:
        super().__init__(maxbytes)

    def size(self, value: TextBlob) -> int:
        return value.nbytes


TEXTS = _Texts()
