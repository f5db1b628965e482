"""Sample sources: what the flows read their samples from, one batch at a time.

A flow's ``samples`` may be

* a list (or tuple) of samples, as always;
* an *indexed source*: an object with ``__len__`` and ``batch(start, stop)``
  returning the samples at those positions (a database query, a folder listing
  read in pages, a generator of synthetic data). It may be asked for a batch
  again (the flow's lazy outputs re-read it for the samples' metadata);
* a *stream*: any other iterable that yields lists of samples (batches of any
  size; the flow regroups them into batches of ``batch_size``). A stream is
  read once; if it also has ``__len__``, its length is checked.

A source may declare a ``version`` attribute (a str or int): the samples it
yields that are lazily loaded and carry no ``data_version`` of their own get
it, so that a new version recomputes them (see `samplepipe.DelayedSample`).

An indexed source may also declare ``fingerprint(start, stop)``: a non-empty
str that changes whenever ``batch(start, stop)`` would return other samples
(another key, other data, other metadata), e.g. built from the version of the
table or the checksum of the file the batch is read from, and the positions.
A batch whose fingerprint and steps are unchanged is then recognised without
being read: a cached run of the thread runner never calls ``batch`` for it,
and a data set that grew reads only the batches that changed. The fingerprint
is a promise, as ``data_version`` is: a batch whose samples changed under an
unchanged fingerprint is not recomputed. The checkpoints themselves keep each
sample's own identity, so a wrong or dropped fingerprint costs a re-read, not
a recomputation, once it is fixed.

The flow never holds more than the batches in flight: keys are checked for
duplicates across batches through a compact table of 8-byte digests (16 bytes
per sample with their positions), and a duplicate is an error before any
sample of its batch is written.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import SourceError as SourceError
from .storage.keys import check_keys
from .storage.shard_index import KeyFilter
from .wrappers._sample import DelayedSample, Sample, SampleSet

__all__ = [
    "IndexedSource",
    "SampleSource",
    "SourceBatch",
    "SourceError",
    "as_source",
    "estimate_batch_size",
]

#: What the flows aim a batch at when ``batch_size`` is None: its input bytes.
BATCH_BYTES = 32 * 2**20
#: Samples per batch when the size of a sample is unknown (not an array).
DEFAULT_BATCH = 1000
MAX_AUTO_BATCH = 250_000


@runtime_checkable
class IndexedSource(Protocol):
    """A data set read in slices: ``len(source)`` and ``source.batch(start, stop)``."""

    def __len__(self) -> int: ...

    def batch(self, start: int, stop: int) -> Sequence[Any]: ...


class SampleSource:
    """The flows' view of their samples: batches, keys checked, length checked.

    Build it with `as_source`. Iterating `batches` yields ``(start, samples)``
    in order. ``indexed`` says whether `batch` may be called again later.
    """

    def __init__(self, obj: Any, what: str = "samples") -> None:
        self.what = what
        self.obj = obj
        self.version = getattr(obj, "version", None)
        if isinstance(obj, list | tuple) or (
            isinstance(obj, Sequence) and not isinstance(obj, str | bytes)
        ):
            self.kind = "list"
            self.length: int | None = len(obj)
        elif isinstance(obj, IndexedSource) and not isinstance(obj, str):
            self.kind = "indexed"
            self.length = _length(obj, what)
        elif isinstance(obj, Iterable) and not isinstance(
            obj, str | bytes | dict | np.ndarray | Sample | SampleSet
        ):
            self.kind = "stream"
            self.length = _length(obj, what) if hasattr(obj, "__len__") else None
        else:
            msg = (
                f"{what} must be a list of samples, an object with __len__ and "
                "batch(start, stop), or an iterable of lists of samples; got "
                f"{type(obj).__name__}. Build samples with "
                "samplepipe.Sample(data, key=...)."
            )
            raise TypeError(msg)
        if self.version is not None and not isinstance(self.version, str | int):
            msg = (
                f"{what}.version must be a str or an int, got "
                f"{type(self.version).__name__} {self.version!r}."
            )
            raise TypeError(msg)
        self._fingerprint = getattr(obj, "fingerprint", None)
        if self.kind != "indexed":
            self._fingerprint = None
        elif self._fingerprint is not None and not callable(self._fingerprint):
            msg = (
                f"{what}.fingerprint must be a method fingerprint(start, stop) "
                f"returning a str, got {type(self._fingerprint).__name__}."
            )
            raise TypeError(msg)
        self._seen = _KeyTable()
        self._read = False
        # batches whose keys are in _seen: every one before _until, and _done
        self._settled = threading.Condition()
        self._until = 0
        self._done: dict[int, int] = {}
        self._closed = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the run's bookkeeping (keys seen, the batches' turns).

        What `PipelineOutputs` keeps of an indexed source: ``batch`` reads again.
        """
        state = dict(self.__dict__)
        for name in ("_seen", "_settled"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._seen = _KeyTable()
        self._settled = threading.Condition()

    @property
    def indexed(self) -> bool:
        return self.kind in ("list", "indexed")

    def __len__(self) -> int:
        if self.length is None:
            msg = f"{self.what} is a stream: its length is known once it is read."
            raise TypeError(msg)
        return self.length

    def batch(self, start: int, stop: int) -> list[Any]:
        """The samples at ``[start:stop]`` (lists and indexed sources only)."""
        if self.kind == "list":
            return list(self.obj[start:stop])
        if self.kind != "indexed":
            msg = f"{self.what} is a stream: it cannot be read again."
            raise TypeError(msg)
        try:
            got = self.obj.batch(start, stop)
        except Exception as exc:
            msg = (
                f"{self.what}.batch({start}, {stop}) raised {type(exc).__name__}: {exc}"
            )
            raise SourceError(msg) from exc
        try:
            got = list(got)
        except TypeError:
            msg = (
                f"{self.what}.batch({start}, {stop}) returned "
                f"{type(got).__name__}; it must return a list of samples."
            )
            raise TypeError(msg) from None
        if len(got) != stop - start:
            msg = (
                f"{self.what}.batch({start}, {stop}) returned {len(got)} samples "
                f"for {stop - start} positions: a source must give exactly the "
                f"samples of the positions asked for (its __len__ is "
                f"{self.length})."
            )
            raise ValueError(msg)
        return self._versioned(got)

    def batches(self, batch_size: int | None) -> Iterator[tuple[int, list[Any]]]:
        """``(start, samples)`` of each batch, checked, in order; once only.

        A stream's items are regrouped into batches of ``batch_size``; with
        None, each item it yields is a batch (empty ones skipped).
        """
        if self._read:
            msg = f"{self.what} was read already (a source is read once per run)."
            raise RuntimeError(msg)
        self._read = True
        if self.kind == "stream":
            yield from self._stream_batches(batch_size)
            return
        n = len(self)
        if batch_size is None:
            batch_size = DEFAULT_BATCH
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield start, self.checked(start, self.batch(start, stop))

    @property
    def fingerprinted(self) -> bool:
        """Whether the source fingerprints its batches (see the module docs)."""
        return self._fingerprint is not None

    def fingerprint(self, start: int, stop: int) -> str:
        """The source's fingerprint of ``[start:stop]``, checked."""
        try:
            got = self._fingerprint(start, stop)  # type: ignore[misc]
        except Exception as exc:
            msg = (
                f"{self.what}.fingerprint({start}, {stop}) raised "
                f"{type(exc).__name__}: {exc}"
            )
            raise SourceError(msg) from exc
        if not isinstance(got, str) or not got:
            msg = (
                f"{self.what}.fingerprint({start}, {stop}) returned {got!r}; it "
                "must return a non-empty str that changes whenever "
                f"batch({start}, {stop}) would return other samples (keys, data "
                "or metadata)."
            )
            raise TypeError(msg)
        return got

    def unread_batches(
        self, batch_size: int | None
    ) -> Iterator[tuple[int, SourceBatch]]:
        """``(start, SourceBatch)`` of each batch of a fingerprinted source; once only.

        Nothing is read here: a `SourceBatch` reads its samples when first
        asked for them (`SourceBatch.read`), after every batch before it has
        had its keys checked (`settle`), so that a duplicate key is an error
        before anything of its batch is written.
        """
        if self._read:
            msg = f"{self.what} was read already (a source is read once per run)."
            raise RuntimeError(msg)
        self._read = True
        n = len(self)
        size = batch_size or DEFAULT_BATCH
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield start, SourceBatch(self, start, stop, self.fingerprint(start, stop))

    def settle(self, start: int, stop: int, keys: list[str] | None = None) -> None:
        """Add the keys of ``[start:stop]`` (if given) to the checked ones.

        Batches read later wait until every batch before them has settled. A
        batch that failed settles without keys (nothing of it was written).
        Raises ``ValueError`` if a key was seen before (the batch settles still).
        """
        with self._settled:
            try:
                if keys is not None:
                    self._seen.add(keys, start, self.what)
            finally:
                if start >= self._until:
                    self._done[start] = stop
                while self._until in self._done:
                    self._until = self._done.pop(self._until)
                self._settled.notify_all()

    def await_turn(self, start: int, stop: int) -> None:
        """Return once every batch before ``[start:stop]`` has settled its keys."""
        with self._settled:
            while self._until < start and not self._closed:
                self._settled.wait(1.0)
            if self._closed:
                msg = f"the run ended before batch [{start}:{stop}] was read"
                raise RuntimeError(msg)

    def read_in_order(self, start: int, stop: int) -> list[Any]:
        """``batch(start, stop)``, checked, once the batches before it settled."""
        self.await_turn(start, stop)
        keys: list[str] | None = None
        try:
            samples = self._check_samples(start, self.batch(start, stop))
            keys = [s.key for s in samples]
        finally:
            self.settle(start, stop, keys)
        return samples

    def close(self) -> None:
        """The run is over: batches still waiting to be read fail."""
        with self._settled:
            self._closed = True
            self._settled.notify_all()

    def _stream_batches(
        self, batch_size: int | None
    ) -> Iterator[tuple[int, list[Any]]]:
        pending: list[Any] = []
        start = 0
        items = iter(self.obj)
        number = 0
        while True:
            try:
                part = next(items)
            except StopIteration:
                break
            except Exception as exc:
                msg = (
                    f"{self.what} raised {type(exc).__name__}: {exc} while yielding "
                    f"item {number} (the batch from position {start + len(pending)})"
                )
                raise SourceError(msg) from exc
            if isinstance(part, Sample | SampleSet) or not isinstance(part, Iterable):
                msg = (
                    f"{self.what} yielded {type(part).__name__} (item {number}); a "
                    "stream yields lists of samples (batches)."
                )
                raise TypeError(msg)
            number += 1
            pending.extend(part)
            size = batch_size or len(pending)
            while pending and len(pending) >= size:
                batch, pending = pending[:size], pending[size:]
                self._check_not_longer(start + len(batch))
                yield start, self.checked(start, batch)
                start += len(batch)
        if pending:
            self._check_not_longer(start + len(pending))
            yield start, self.checked(start, pending)
            start += len(pending)
        if self.length is not None and start != self.length:
            msg = (
                f"{self.what} yielded {start} samples but its __len__ is "
                f"{self.length}; a source must yield exactly __len__ samples."
            )
            raise ValueError(msg)
        self.length = start

    def _check_not_longer(self, stop: int) -> None:
        if self.length is not None and stop > self.length:
            msg = (
                f"{self.what} yielded more than its __len__ ({self.length}) "
                "samples; a source must yield exactly __len__ samples."
            )
            raise ValueError(msg)

    def checked(self, start: int, samples: list[Any]) -> list[Any]:
        """``samples`` (at ``start``) checked: types, keys, duplicates; versioned."""
        samples = self._check_samples(start, samples)
        with self._settled:
            self._seen.add([s.key for s in samples], start, self.what)
        return self._versioned(samples)

    def _check_samples(self, start: int, samples: list[Any]) -> list[Any]:
        """``samples`` (at ``start``): each a `Sample` with a valid key."""
        for i, s in enumerate(samples, start):
            if not isinstance(s, Sample):
                kind = "a SampleSet" if isinstance(s, SampleSet) else type(s).__name__
                msg = (
                    f"{self.what}[{i}] is {kind}; the flows take Sample objects "
                    "(build them with samplepipe.Sample(data, key=...))."
                )
                raise TypeError(msg)
        check_keys([getattr(s, "key", None) for s in samples], start, self.what)
        return samples

    def _versioned(self, samples: list[Any]) -> list[Any]:
        """``samples``, the lazy ones without a ``data_version`` given ours."""
        if self.version is not None:
            for s in samples:
                if isinstance(s, DelayedSample) and "data_version" not in vars(s):
                    object.__setattr__(s, "data_version", self.version)
        return samples

    def to_list(self) -> list[Any]:
        """Every sample, checked (a fit needs them all at once)."""
        out: list[Any] = []
        for _, batch in self.batches(max(len(self), 1) if self.indexed else 10_000):
            out.extend(batch)
        return out


class SourceBatch:
    """Positions ``[start:stop]`` of a fingerprinted source, read when needed.

    The flows pass it to a step's task instead of the samples: a batch whose
    task is cached is never read. `read` reads it once (later calls return the
    same samples); ``error`` is what reading raised, if it did.
    """

    __slots__ = (
        "_lock",
        "_samples",
        "error",
        "fingerprint",
        "settled",
        "source",
        "start",
        "stop",
    )

    def __init__(self, source: SampleSource, start: int, stop: int, fingerprint: str):
        self.source = source
        self.start, self.stop = start, stop
        self.fingerprint = fingerprint
        self.settled = False  # its keys are checked (read, or from a manifest)
        self.error: BaseException | None = None
        self._samples: list[Any] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"<{self.source.what}[{self.start}:{self.stop}], not read yet>"

    @property
    def keys(self) -> list[str] | None:
        """The samples' keys once read, else None."""
        return None if self._samples is None else [s.key for s in self._samples]

    def wait(self) -> None:
        """Return once it may be read (`SampleSource.await_turn`)."""
        if not self.settled and self._samples is None:
            self.source.await_turn(self.start, self.stop)

    def read(self) -> list[Any]:
        """The batch's samples, read and checked on the first call."""
        with self._lock:
            if self._samples is None:
                try:
                    if self.settled:  # its keys were checked already
                        got = self.source.batch(self.start, self.stop)
                        self._samples = self.source._check_samples(self.start, got)
                    else:
                        self._samples = self.source.read_in_order(self.start, self.stop)
                        self.settled = True
                except Exception as exc:
                    self.error = exc
                    raise
            return self._samples

    def settle(self, keys: list[str] | None) -> None:
        """Check its keys (from a cached manifest) without reading it.

        None: it failed unread; the batches after it need not wait for it.
        """
        with self._lock:
            if not self.settled:
                self.settled = True
                self.source.settle(self.start, self.stop, keys)


def read_samples(samples: Any) -> Any:
    """``samples``, or the samples of a `SourceBatch`, read now."""
    return samples.read() if isinstance(samples, SourceBatch) else samples


def await_turn(samples: Any) -> None:
    """Wait until a `SourceBatch` may be read (anything else: return)."""
    if isinstance(samples, SourceBatch):
        samples.wait()


def _length(obj: Any, what: str) -> int:
    n = len(obj)
    if not isinstance(n, int) or n < 0:
        msg = f"len({what}) must be an int >= 0, got {n!r}."
        raise ValueError(msg)
    return n


def as_source(samples: Any, what: str = "samples") -> SampleSource:
    """A `SampleSource` of a list, an indexed source or a stream of batches."""
    if isinstance(samples, SampleSource):
        return samples
    return SampleSource(samples, what)


class _KeyTable:
    """Keys seen so far, as 8-byte digests with their positions.

    Sorted runs merged like a binary counter (a log-structured table): adding
    a batch and looking its keys up cost O(b log N). Past `held` keys the runs
    in memory are merged into one run written to a temporary file (16 B a key
    on disk) and only a Bloom filter of it is held (`KeyFilter`, 1.25 B a
    key): a batch's keys are looked up on disk where a filter says they may
    be (about 1 % of them), so memory stays bounded whatever the number of
    keys. A digest match is then confirmed against the batch's own keys when
    both are in it; across batches two keys with one 64-bit digest (about 1
    in 10^7 at ten million keys) are reported as duplicates, never written.
    """

    held = 1 << 20  # keys in memory (16 MiB); past it, a run goes to disk

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_held = 0
        self._spilled: list[tuple[int, int, KeyFilter]] = []  # offset, count
        self._file: Any = None

    @staticmethod
    def digests(keys: list[str]) -> np.ndarray:
        # the table lives in one process for one run: Python's own 64-bit str
        # hash (SipHash, computed once per str object) serves as the digest
        return np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))

    @staticmethod
    def _probed(digests: np.ndarray) -> np.ndarray:
        """The two 64-bit columns a `KeyFilter` probes with (a mix of one hash)."""
        d0 = digests.view("<u8")
        with np.errstate(over="ignore"):
            d1 = (d0 ^ (d0 >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9) | 1
        return np.stack([d0, d1], axis=1)

    def add(self, keys: list[str], start: int, what: str) -> None:
        if not keys:
            return
        digests = self.digests(keys)
        order = np.argsort(digests, kind="stable")
        sorted_ = digests[order]
        same = np.flatnonzero(sorted_[1:] == sorted_[:-1])
        for j in same:
            a, b = sorted((int(order[j]), int(order[j + 1])))
            if keys[a] == keys[b]:
                msg = (
                    f"{what} got key {keys[a]!r} for samples {start + a} and "
                    f"{start + b}; keys must be unique (nothing of this batch "
                    "was written)."
                )
                raise ValueError(msg)
        seen = self._seen_before(digests)
        if seen is not None:
            i, earlier = seen
            msg = (
                f"{what} got key {keys[i]!r} for samples {earlier} and "
                f"{start + i}; keys must be unique (nothing of the batch "
                f"from sample {start} on was written)."
            )
            raise ValueError(msg)
        self.runs.append((sorted_, (order + start).astype(np.int64)))
        self._n_held += len(keys)
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= len(self.runs[-1][0]):
            (older, at_older), (newer, at_newer) = self.runs[-2], self.runs[-1]
            self.runs[-2:] = [self._merged([older, newer], [at_older, at_newer])]
        if self._n_held > self.held:
            self._spill()

    @staticmethod
    def _merged(
        digests: list[np.ndarray], positions: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        merged = np.concatenate(digests)
        by = np.argsort(merged, kind="stable")
        return merged[by], np.concatenate(positions)[by]

    def _seen_before(self, digests: np.ndarray) -> tuple[int, int] | None:
        """``(i, earlier position)`` of a digest seen before, or None."""
        for run, positions in self.runs:
            at = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            hit = np.flatnonzero(run[at] == digests)
            if hit.size:
                i = int(hit[0])
                return i, int(positions[at[i]])
        if not self._spilled:
            return None
        probed = self._probed(digests)
        for offset, count, bloom in self._spilled:
            maybe = np.flatnonzero(bloom.might_hold(probed))
            if not maybe.size:
                continue
            # mapped while looked up: the pages read leave memory with the map
            run = np.memmap(self._file, "<i8", "r", offset, (count,))
            at = np.minimum(np.searchsorted(run, digests[maybe]), count - 1)
            hit = np.flatnonzero(run[at] == digests[maybe])
            if hit.size:
                j = int(hit[0])
                positions = np.memmap(
                    self._file, "<i8", "r", offset + 8 * count, (count,)
                )
                return int(maybe[j]), int(positions[at[j]])
        return None

    def _spill(self) -> None:
        """Write the runs in memory to the table's file as one; keep its filter."""
        import tempfile

        digests, positions = self._merged(*map(list, zip(*self.runs)))
        if self._file is None:  # unnamed: gone with the table, or the process
            self._file = tempfile.TemporaryFile(prefix="samplepipe-keys-")
        self.runs = []
        self._n_held = 0
        f = self._file
        offset = f.seek(0, 2)
        f.write(np.ascontiguousarray(digests, "<i8").data)
        f.write(np.ascontiguousarray(positions, "<i8").data)
        f.flush()
        n, step = len(digests), 1 << 16
        chunks = (self._probed(digests[i : i + step]) for i in range(0, n, step))
        self._spilled.append((offset, n, KeyFilter(chunks, n)))

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the runs on disk: their filters only)."""
        runs = sum(a.nbytes + b.nbytes for a, b in self.runs)
        return runs + sum(bloom.nbytes for _, _, bloom in self._spilled)


def estimate_batch_size(sample: Any) -> int:
    """Samples per batch for about `BATCH_BYTES` of input, from one sample.

    A lazily loaded sample is loaded once to measure it. Data without
    ``nbytes`` (not an array) gives `DEFAULT_BATCH`.
    """
    try:
        data = sample.data
    except Exception:  # noqa: BLE001 - the run reports it, with its key
        return DEFAULT_BATCH
    nbytes = getattr(data, "nbytes", None)
    if not isinstance(nbytes, int) or nbytes <= 0:
        return DEFAULT_BATCH
    return int(min(MAX_AUTO_BATCH, max(1, BATCH_BYTES // nbytes)))
