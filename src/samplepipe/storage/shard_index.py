"""The index of shards: a few bytes held per entry, the rest read on demand.

A shard's records (`samplepipe.storage.identity.Record` text) are read from
its file when the shard is indexed and reduced to arrays (`_Columns`, about
80 B an entry): per entry ``(group, row, time)`` (24 B), its inputs (16 B,
`inputs_digests`), a key check (8 B), its payload checksum (16 B), a kind and
a ``format:step`` code (1 B each, into per-shard tables) and its key's
8-byte lookup digest, sorted (12 B). Those arrays are held within a bound
(`COLUMNS`, 32 MiB) and read back from the shard when dropped. What is held
for every listed shard is small: its stamp, newest time, smallest and
largest key, a Bloom filter of its keys (`KeyFilter`, 10 bits a key) and
whether each entry was verified (nothing once all were). A lookup asks only
the shards whose key range and filter may hold a wanted key. The record text
itself is read back from the shard on demand (`ShardIndex.record`), through a
bounded cache (`TEXTS`).

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

import bisect
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar, overload

import numpy as np

from ..errors import ChangedWhileReading
from .files import Stamp
from .identity import Identity, Record
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

    Column 0 finds candidate entries (`candidates`); column 1 confirms them.
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


class KeyFilter:
    """A Bloom filter of one shard's key digests: 10 bits a key, ~1 % false hits.

    Held per shard in place of its key digests (16 B a key), it tells which
    shards may hold a wanted key; the shard's own index (read back on demand)
    then confirms it. Probe ``i`` of a key is ``(d0 + i * d1) mod m`` of its
    `key_digests` ``(d0, d1)``: no further hashing.
    """

    PROBES = 5
    BITS_PER_KEY = 10

    def __init__(
        self, digests: np.ndarray | Iterable[np.ndarray], n: int | None = None
    ) -> None:
        """Of an ``(n, 2)`` array of key digests, or of ``n`` of them in chunks."""
        if n is None:  # probes are 40 B a key: made a chunk at a time
            assert isinstance(digests, np.ndarray)
            whole, n, step = digests, len(digests), 1 << 16
            digests = (whole[i : i + step] for i in range(0, n, step))
        m = max(64, self.BITS_PER_KEY * n)
        self.m = m + (-m) % 8
        flags = np.zeros(self.m, dtype=bool)
        for chunk in digests:
            flags[self._probes(chunk)] = True
        self.bits = np.packbits(flags, bitorder="little")

    def _probes(self, digests: np.ndarray) -> np.ndarray:
        d0 = digests[:, 0].astype("<u8", copy=False)
        d1 = digests[:, 1].astype("<u8", copy=False)
        m = np.uint64(self.m)
        return np.concatenate(
            [(d0 + np.uint64(i) * d1) % m for i in range(self.PROBES)]
        )

    def might_hold(self, digests: np.ndarray) -> np.ndarray:
        """Per key digest ``(d0, d1)``: False if the shard surely lacks it."""
        if not len(digests):
            return np.zeros(0, dtype=bool)
        probes = self._probes(digests)
        shifts = (probes & np.uint64(7)).astype(np.uint8)
        hit = (self.bits[probes >> np.uint64(3)] >> shifts) & 1
        return hit.reshape(self.PROBES, len(digests)).all(axis=0)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes


class _Columns:
    """The per-entry arrays of one shard (see `ShardIndex`): about 80 B an entry."""

    def __init__(self, entries: np.ndarray) -> None:
        n = len(entries)
        self.entries = entries  # (group, row, time) per entry
        self.inputs = np.zeros(n, dtype="V16")  # see `inputs_digests`
        self.key_checks = np.zeros(n, dtype="<u8")  # column 1 of `key_digests`
        self.checksums = np.zeros(n, dtype="V16")
        self.kind_codes = np.zeros(n, dtype=np.uint8)
        self.kinds: tuple[str, ...] = ("",)
        self.step_codes = np.zeros(n, dtype=np.uint8)
        self.steps: tuple[str, ...] = ("",)  # "format:step"; "" if malformed
        self.odd: dict[int, str] = {}  # checksums that are not 32 hex digits
        self.lookup = np.zeros(0, dtype="<u8")  # column 0 of the keys, sorted
        self.positions = np.zeros(0, dtype="<i4")  # the entry of each of those
        self.views: tuple[Any, Any, Any] | None = None

    def step_code(self, step_prefix: str) -> int:
        """The code of ``format:step`` in `step_codes`; -1 if no entry has it."""
        try:
            return self.steps.index(step_prefix) if step_prefix else -1
        except ValueError:
            return -1

    @property
    def nbytes(self) -> int:
        arrays = (
            self.entries,
            self.inputs,
            self.key_checks,
            self.checksums,
            self.kind_codes,
            self.step_codes,
            self.lookup,
            self.positions,
        )
        return sum(a.nbytes for a in arrays) + 64 * len(self.odd) + 512


class ShardIndex:
    """The index of one shard file as of one stamp.

    ``status`` is ``ok``, ``corrupt`` (unreadable, or a broken index) or
    ``unknown`` (readable HDF5 that samplepipe did not write). ``verified``
    holds per entry ``-1`` (not checked yet), ``0`` (its payload fails its
    checksum) or ``1`` (verified). ``records`` reads the record texts back
    from the shard (through `TEXTS`); `record` reads one.

    Held for as long as the shard is listed: its size, stamp, newest time,
    smallest and largest key, a `KeyFilter` of its keys and ``verified``
    (nothing when every entry is verified). The per-entry arrays (``entries``,
    ``inputs``, ``checksums``, ...) are held while `COLUMNS` keeps them and
    read back from the shard on demand (`columns`): a folder's index costs a
    few bytes a checkpoint, whatever its size.

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
        cols = _Columns(_EMPTY_ENTRIES if entries is None else entries)
        self._n = len(cols.entries)
        self._cols: _Columns | None = cols
        self._verified: np.ndarray | None = np.full(self._n, UNKNOWN, dtype=np.int8)
        self.reader: Callable[[ShardIndex], TextBlob | None] | None = None
        self.loader: Callable[[ShardIndex], _Columns | None] | None = None
        self.filter: KeyFilter | None = None  # None: may hold any key
        self.key_range: tuple[str, str] | None = None  # None: any key
        self.max_time = 0

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
        cols = index._cols
        assert cols is not None
        keys: list[str] = []
        inputs: list[str] = []
        sums: list[bytes] = []
        kind_of: dict[str, int] = {"": 0}
        step_of: dict[str, int] = {"": 0}
        kinds: list[int] = []
        steps: list[int] = []
        odd = cols.odd
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
        if n != index._n:
            msg = f"{n} records for {index._n} entries"
            raise ValueError(msg)
        cols.inputs = inputs_digests(inputs).copy()
        cols.checksums = np.frombuffer(b"".join(sums), dtype="V16").copy()
        cols.kind_codes = _codes(kinds)
        cols.kinds = tuple(kind_of)
        cols.step_codes = _codes(steps)
        cols.steps = tuple(step_of)
        digests = key_digests(keys)
        cols.key_checks = digests[:, 1].copy()
        order = np.argsort(digests[:, 0], kind="stable")
        cols.lookup = digests[order, 0].copy()
        cols.positions = order.astype("<i4")
        if n:
            index.filter = KeyFilter(digests)
            index.key_range = (min(keys), max(keys))
            index.max_time = int(cols.entries[:, 2].max())
        return index

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ShardIndex({self.path!r}, {self.status!r}, {len(self)} entries)"

    # -- the per-entry arrays, held while COLUMNS keeps them ------------------
    def columns(self) -> _Columns:
        """The per-entry arrays, read back from the shard if dropped.

        Raises `ChangedWhileReading` when they were dropped and the shard changed
        or vanished since it was indexed.
        """
        cols = self._cols
        if cols is not None:
            return cols
        loader = self.loader
        cols = None if loader is None else loader(self)
        if cols is None or len(cols.entries) != self._n:
            msg = f"shard {self.path!r} changed or vanished since it was indexed"
            raise ChangedWhileReading(msg)
        self._cols = cols
        COLUMNS.hold(self, cols.nbytes)
        return cols

    def release(self) -> None:
        """Drop the per-entry arrays (read back on demand); see `COLUMNS`."""
        if self.loader is None:
            return  # nothing to read them back with
        self._cols = None
        with _VERIFIED_LOCK:
            v = self._verified
            if v is not None and len(v) and bool((v == GOOD).all()):
                self._verified = None  # all verified: nothing to hold

    @property
    def verified(self) -> np.ndarray:
        """Per entry: UNKNOWN, BAD or GOOD (int8)."""
        v = self._verified
        if v is None:
            with _VERIFIED_LOCK:
                if self._verified is None:
                    self._verified = np.full(self._n, GOOD, dtype=np.int8)
                v = self._verified
        return v

    @verified.setter
    def verified(self, value: np.ndarray) -> None:
        with _VERIFIED_LOCK:
            self._verified = value

    entries = property(lambda self: self.columns().entries, doc="(group, row, time)")
    inputs = property(lambda self: self.columns().inputs, doc="`inputs_digests`")
    key_checks = property(lambda self: self.columns().key_checks, doc="key check")
    checksums = property(lambda self: self.columns().checksums, doc="payload sums")
    kind_codes = property(lambda self: self.columns().kind_codes, doc="kind codes")
    kinds = property(lambda self: self.columns().kinds, doc="kind of each code")
    step_codes = property(lambda self: self.columns().step_codes, doc="step codes")
    steps = property(lambda self: self.columns().steps, doc="format:step of a code")
    odd = property(lambda self: self.columns().odd, doc="odd checksums")

    # -- per entry -----------------------------------------------------------
    def _make_views(self) -> tuple[Any, Any, Any]:
        cols = self._cols or self.columns()
        if cols.views is None:
            flat = np.ascontiguousarray(cols.entries, "<i8").data.cast("B")
            cols.views = (
                _Checksums(cols),
                _Kinds(cols),
                _Locations(flat.cast("q")),
            )
        return cols.views

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
        cols = self.columns()
        return cols.step_codes == cols.step_code(step_prefix)

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
    def __init__(self, cols: _Columns) -> None:
        self.odd = cols.odd
        self.raw = cols.checksums.data.cast("B")
        self.n = len(cols.entries)

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
    def __init__(self, cols: _Columns) -> None:
        self.kinds = cols.kinds
        self.codes = cols.kind_codes

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


class _HeldColumns:
    """The shards whose per-entry arrays this process holds, oldest first.

    Bounded in bytes (``maxbytes``, default 32 MiB: about 400,000 entries);
    past it the oldest shards' arrays are dropped (`ShardIndex.release`) and
    read back from their file when next asked for. The newest shard's are
    always kept, however large.
    """

    def __init__(self, maxbytes: int = 32 << 20) -> None:
        self.maxbytes = maxbytes
        self._held: OrderedDict[int, tuple[ShardIndex, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def hold(self, index: ShardIndex, nbytes: int) -> None:
        """Count ``index``'s arrays as held; drop the oldest past the bound."""
        dropped: list[ShardIndex] = []
        with self._lock:
            old = self._held.pop(id(index), None)
            if old is not None:
                self._bytes -= old[1]
            self._held[id(index)] = (index, nbytes)
            self._bytes += nbytes
            while self._bytes > self.maxbytes and len(self._held) > 1:
                _, (victim, size) = self._held.popitem(last=False)
                self._bytes -= size
                dropped.append(victim)
        for victim in dropped:
            victim.release()

    def forget(self, index: ShardIndex) -> None:
        """Stop counting ``index`` (its folder forgot it)."""
        with self._lock:
            old = self._held.pop(id(index), None)
            if old is not None:
                self._bytes -= old[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held now."""
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._bytes = 0


COLUMNS = _HeldColumns()
_VERIFIED_LOCK = threading.Lock()


def candidates(
    live: Sequence[tuple[int, ShardIndex]],
    digests: np.ndarray,
    keys: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
    """``(wanted index, slot, position, time, rank, columns)`` of these keys.

    Found by column 0 of the keys' `key_digests` (not confirmed), in the
    shards whose key range (when ``keys`` are given) and `KeyFilter` may
    hold them, grouped by wanted index and newest first (in any order
    when each has one entry); ``rank`` orders the shards by path (a tie
    of times goes to the later path); ``columns`` maps each slot found to
    its shard's arrays. Raises `ChangedWhileReading` if a shard to be asked
    changed since it was indexed.
    """
    every = np.arange(len(digests))
    # a batch's keys outside a shard's key range skip its filter: at ~1 % false
    # hits a key, a filter alone lets a batch of thousands read every shard
    by_key = None
    if keys:
        lo_key, hi_key = min(keys), max(keys)
        live = [
            (s, index)
            for s, index in live
            if index.key_range is None
            or not (index.key_range[1] < lo_key or hi_key < index.key_range[0])
        ]
        if len(live) > 2:  # keys across many shards' ranges (s/9999999, s/10000000)
            order = sorted(range(len(keys)), key=keys.__getitem__)
            by_key = ([keys[i] for i in order], np.array(order, dtype=np.int64))
    found_w, found_s, found_p, found_t = [], [], [], []
    columns: dict[int, _Columns] = {}
    for s, index in live:
        asked = every
        if by_key is not None and index.key_range is not None:
            lo = bisect.bisect_left(by_key[0], index.key_range[0])
            hi = bisect.bisect_right(by_key[0], index.key_range[1])
            asked = by_key[1][lo:hi]  # only the keys within its range
        if index.filter is not None:
            asked = asked[index.filter.might_hold(digests[asked])]
        if not len(asked):
            continue
        cols = index.columns()
        needles = digests[asked, 0]
        lo_at = np.searchsorted(cols.lookup, needles, "left")
        count = np.searchsorted(cols.lookup, needles, "right") - lo_at
        total = int(count.sum())
        if not total:
            continue
        columns[s] = cols
        at = np.repeat(lo_at - (np.cumsum(count) - count), count)
        positions = cols.positions[at + np.arange(total)]
        found_w.append(np.repeat(asked, count))
        found_s.append(np.full(total, s, dtype="<i4"))
        found_p.append(positions)
        found_t.append(cols.entries[positions, 2])
    if not found_w:
        none = np.zeros(0, "<i8")
        return none, none.astype("<i4"), none.astype("<i4"), none, none, columns
    w = np.concatenate(found_w)
    slots = np.concatenate(found_s)
    positions = np.concatenate(found_p).astype("<i4")
    times = np.concatenate(found_t)
    path_of = {s: index.path for s, index in live}
    rank_of = np.zeros(max(columns) + 1, dtype="<i8")
    for r, s in enumerate(sorted(columns, key=path_of.__getitem__)):
        rank_of[s] = r
    ranks = rank_of[slots]
    if np.bincount(w).max() == 1:  # one entry a key: any order
        return w, slots, positions, times, ranks, columns
    order_ = np.lexsort((-positions, -ranks, -times, w))
    return (
        w[order_],
        slots[order_],
        positions[order_],
        times[order_],
        ranks[order_],
        columns,
    )


def same_step(
    cols: Mapping[int, _Columns],
    wanted: Sequence[Identity],
    w: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """Whether each candidate's ``format:step`` is its wanted identity's."""
    pairs = [(i.format, i.step) for i in wanted]
    steps = {pair: n for n, pair in enumerate(dict.fromkeys(pairs))}
    of_wanted = np.fromiter(map(steps.__getitem__, pairs), np.int64, len(pairs))
    of_wanted = of_wanted[w]
    prefixes = [f"{fmt}:{step}" for fmt, step in steps]
    same = np.zeros(len(w), bool)
    for s in np.unique(slots).tolist():
        shard = cols[s]
        mine = slots == s
        codes = np.array([shard.step_code(p) for p in prefixes], dtype=np.int64)
        same[mine] = shard.step_codes[positions[mine]] == codes[of_wanted[mine]]
    return same


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
