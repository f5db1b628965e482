"""What `transform_pipeline` returns: its output samples, built on demand.

`PipelineOutputs` is a read-only sequence over the batches' manifests (see
`samplepipe._manifest`): about 100 bytes per sample (keys, input identities,
checksums and shard locations, as columns), not one object per sample. Up to
`PipelineOutputs.held` bytes of them (32 MiB: about 300,000 samples) stay in
memory; past it the oldest batches' manifests go to a temporary file (unnamed,
removed with the outputs) and are read back when their batch is built: memory
stays bounded whatever the number of samples. They are pickled there (a
hundred times faster than their JSON): loading a pickle runs code, and this
file is one that no other process can name, written and read by the outputs
alone. Indexing, slicing and iterating build samples whose data loads lazily
from the checkpoints; `to_list` builds them all. Iteration builds one batch at
a time, so reading every output costs memory for one batch.

The samples' metadata comes from the inputs: a list is held (the caller holds
it anyway), an indexed source is asked for the batch again when a batch is
built. A stream cannot be read again: its outputs carry their key and the
checkpointed values only; so do the outputs of a list once pickled (a list's
samples hold their data: they are not pickled with the outputs).
"""

from __future__ import annotations

import bisect
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from ._manifest import BatchManifest
from .sources import SampleSource
from .wrappers import Sample

__all__ = ["PipelineOutputs"]


class PipelineOutputs(Sequence[Any]):
    """The output samples of a flow run, in input order, built on demand.

    Parameters
    ----------
    source : SampleSource or None
        The run's inputs: a list or an indexed source gives each output the
        metadata of its input sample; a stream (or None) gives keys only.

    Examples
    --------
    >>> outputs = PipelineOutputs(None)
    >>> len(outputs), outputs.to_list()
    (0, [])
    """

    held = 32 << 20  # bytes of manifests in memory; past it, the oldest on disk

    def __init__(self, source: SampleSource | None) -> None:
        self._source = source if source is not None and source.indexed else None
        self._starts: list[int] = []
        self._stops: list[int] = []
        # per batch [(step, manifest)], a manifest on disk as (offset, length)
        self._parts: list[list[tuple[Any, Any]]] = []
        self._built: tuple[int, list[Any]] | None = None
        self._in_memory: deque[tuple[int, int]] = deque()  # (start, bytes), oldest 1st
        self._held_bytes = 0
        self._file: Any = None

    def add_batch(
        self, start: int, stop: int, upstream: Sequence[tuple[Any, Any]]
    ) -> None:
        """Record a finished batch: the manifests its outputs are built from.

        ``upstream`` is the batch's ``[(step, manifest), ...]`` in step order;
        the flows call it as each batch of ``[start:stop]`` finishes.

        Only the last manifest of each checkpointed attribute matters (each
        replaces its attribute); the others are dropped.
        """
        kept: list[tuple[Any, Any]] = []
        seen: set[str] = set()
        for step, manifest in reversed(upstream):
            if manifest.attribute not in seen:
                seen.add(manifest.attribute)
                kept.append((step, manifest))
        at = bisect.bisect(self._starts, start)
        self._starts.insert(at, start)
        self._stops.insert(at, stop)
        self._parts.insert(at, kept[::-1])
        self._built = None
        nbytes = sum(manifest.nbytes for _, manifest in kept)
        self._in_memory.append((start, nbytes))
        self._held_bytes += nbytes
        while self._held_bytes > self.held and len(self._in_memory) > 1:
            oldest, size = self._in_memory.popleft()
            self._held_bytes -= size
            self._spill(bisect.bisect(self._starts, oldest) - 1)

    def _spill(self, number: int) -> None:
        """Write batch ``number``'s manifests to the outputs' file."""
        if self._file is None:  # unnamed: gone with the outputs, or the process
            self._file = tempfile.TemporaryFile(prefix="samplepipe-outputs-")
        f = self._file
        spilled = []
        for step, manifest in self._parts[number]:
            blob = pickle.dumps(manifest, protocol=pickle.HIGHEST_PROTOCOL)
            offset = f.seek(0, 2)
            f.write(blob)
            spilled.append((step, (offset, len(blob))))
        f.flush()
        self._parts[number] = spilled

    def _manifests(self, number: int) -> list[tuple[Any, Any]]:
        """Batch ``number``'s ``[(step, manifest)]``, read back if on disk."""
        parts = self._parts[number]
        if all(isinstance(m, BatchManifest) for _, m in parts):
            return parts
        out = []
        for step, manifest in parts:
            if not isinstance(manifest, BatchManifest):
                offset, length = manifest
                blob = os.pread(self._file.fileno(), length, offset)
                manifest = pickle.loads(blob)  # noqa: S301 - our own unnamed file
            out.append((step, manifest))
        return out

    def __len__(self) -> int:
        return self._stops[-1] if self._stops else 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without a list of inputs (the samples' data): keys only then.

        An indexed source is kept (it reads its samples on demand).
        """
        parts = [self._manifests(number) for number in range(len(self._parts))]
        state = dict(self.__dict__, _built=None, _parts=parts, _file=None)
        state["_in_memory"] = deque()  # every manifest in memory, none to spill
        state["_held_bytes"] = 0
        if self._source is not None and self._source.kind == "list":
            state["_source"] = None
        return state

    @property
    def n_batches(self) -> int:
        """The number of batches (task runs per step) the outputs come from."""
        return len(self._starts)

    def _batch(self, number: int) -> list[Any]:
        if self._built is not None and self._built[0] == number:
            return self._built[1]
        start, stop = self._starts[number], self._stops[number]
        parts = self._manifests(number)
        if self._source is not None:
            current = self._source.batch(start, stop)
        else:
            current = [Sample(None, key=k) for k in parts[-1][1].key_list()]
        for step, manifest in parts:
            current = manifest.samples(current, step)
        self._built = (number, current)
        return current

    def batches(self) -> Iterator[list[Any]]:
        """The output samples one batch at a time (one batch in memory)."""
        for number in range(len(self._starts)):
            batch = self._batch(number)
            self._built = None
            yield batch

    def arrays(self) -> Iterator[np.ndarray]:
        """Each batch's outputs' ``data`` as one array, batch by batch.

        What reading every output costs least: a shard is read once for all
        its samples of the batch, with the checks of loading each sample. The
        data must be arrays of one shape and dtype; a batch with failed
        samples (``on_error="skip"``) raises ``ValueError`` (iterate the
        samples instead).

        Examples
        --------
        >>> outputs = PipelineOutputs(None)
        >>> list(outputs.arrays())
        []
        """
        for number in range(len(self._starts)):
            parts = self._manifests(number)
            with_data = [(s, m) for s, m in parts if m.attribute == "data"]
            if not with_data:  # no step checkpointed data: the inputs' own
                yield np.stack([s.data for s in self._batch(number)])
                self._built = None
                continue
            step, manifest = with_data[-1]
            # the keys the flow checked this manifest against, in order
            keys = manifest.key_list()
            yield manifest.stacked(keys, step)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches():
            yield from batch

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            out: list[Any] = []
            i = start
            while i < stop:
                number = bisect.bisect(self._starts, i) - 1
                batch = self._batch(number)
                first = self._starts[number]
                take = batch[i - first : min(stop, self._stops[number]) - first]
                out.extend(take)
                i += len(take)
            return out
        if not isinstance(index, int):
            msg = f"indices must be integers or slices, not {type(index).__name__}"
            raise TypeError(msg)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("PipelineOutputs index out of range")
        number = bisect.bisect(self._starts, index) - 1
        return self._batch(number)[index - self._starts[number]]

    def to_list(self) -> list[Any]:
        """Every output sample, in a list (their data still loads lazily)."""
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PipelineOutputs | list | tuple):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<PipelineOutputs: {len(self)} samples in {self.n_batches} batches, "
            "built on demand>"
        )
