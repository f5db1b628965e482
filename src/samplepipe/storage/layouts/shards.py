"""The ``"shards"`` layout: one HDF5 file per batch of samples (`ShardsLayout`).

The shard files, the per-process index and the lazy loaders are
`samplepipe.storage.shards`; this module is what a step does with them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import CheckpointWarning
from .. import hdf5
from ..files import is_permanent
from ..formats import Format
from ..identity import Identity
from ..report import ShardEntry, TransformReport
from ..shards import (
    Found,
    ShardFolder,
    ShardIndex,
    ShardLoader,
    is_shard_name,
    is_shard_temporary,
    shard_folder,
    shard_limits,
    split_points,
)
from ..status import Status
from .base import Judged, Layout, LayoutContext, Walked, gc_paused

__all__ = ["ShardsLayout"]

# the first slice of a run, before the size of an output is known
FIRST_SLICE = 100


def folder_of(context: LayoutContext) -> ShardFolder:
    """The `ShardFolder` of a context's ``root``."""
    return shard_folder(context.root, context.storage_options, context.fs)


def entry_of(found: Found) -> ShardEntry:
    """The `ShardEntry` of a found entry (what `ShardLoader` reads)."""
    index, position = found
    checksums, kinds = index.fields()
    group, row = index.locations()[position]
    return _entry((group, row, checksums[position], kinds[position]))


_entry = ShardEntry._make  # one per output sample: the fastest way to build one


def _loader(
    found: Found, options: Any, identity: Any, entry: ShardEntry | None = None
) -> ShardLoader:
    index = found[0]
    if entry is None:
        entry = entry_of(found)
    return ShardLoader.make(index.path, identity, index.stamp, options, entry)


class ShardsLayout(Layout):
    """One HDF5 file per batch of computed samples; see `samplepipe.storage.shards`.

    A shard closes when its payload would pass ``shard_bytes`` (and, if set,
    when it holds ``shard_size`` samples); the wrapped ``transform`` is called
    on slices sized to fill one shard, each shard written as soon as it is
    full (a crash loses at most the shard being built). HDF5 only: no
    ``save_func``, ``load_func``, ``hash_fn`` or sidecar format.
    """

    name = "shards"

    def check_parameters(self, parameters: Mapping[str, Any]) -> None:  # noqa: D102
        shard_limits(
            parameters.get("shard_size"),
            parameters.get("shard_bytes"),
            "CheckpointWrapper",
        )
        for name in ("save_func", "load_func", "hash_fn"):
            value = parameters.get(name)
            if value is not None:
                msg = (
                    f"CheckpointWrapper got {name}={value!r} with layout='shards'; "
                    "shards store every sample in the default HDF5 format, one "
                    f"file per batch: remove {name} or use layout='files'."
                )
                raise ValueError(msg)

    def check_format(self, fmt: Format, parameters: Mapping[str, Any]) -> None:  # noqa: D102
        if fmt.sidecar:
            msg = (
                f"CheckpointWrapper got format={parameters.get('format')!r} with "
                "layout='shards'; shards store every sample in the HDF5 format: "
                "remove format or use layout='files'."
            )
            raise ValueError(msg)

    # -- a batch -----------------------------------------------------------
    def transform(  # noqa: D102 - see Layout.transform
        self,
        context: LayoutContext,
        wanted: Sequence[Identity],
        live: Sequence[int],
        compute: Callable[[Sequence[int]], Mapping[int, Any]],
        report: TransformReport | None = None,
    ) -> list[Callable[[], Any] | None]:
        with gc_paused():
            folder = folder_of(context)
            if context.force:
                results: list[Found | str] = [Status.MISSING] * len(live)
            else:
                results = folder.find([wanted[i] for i in live])
        found: dict[int, Found] = {}
        todo: list[int] = []
        bad: dict[str, int] = {}
        for i, result in zip(live, results):
            if isinstance(result, Found):
                found[i] = result
                continue
            todo.append(i)
            if result != Status.MISSING:
                bad[result] = bad.get(result, 0) + 1
        if bad:
            context.warn_recomputed(bad, "corrupt: failing its checksum")
        unreadable = [
            p for p, index in folder.shards.items() if index.status == Status.CORRUPT
        ]
        if todo and unreadable:
            # an unreadable shard's keys are unknown: its samples look missing
            warnings.warn(
                f"{context.name} computes {len(todo)} "
                f"checkpoint(s) in {context.root!r} that no readable shard "
                f"holds; {len(unreadable)} shard(s) there are unreadable (corrupt), "
                f"e.g. {unreadable[0]!r}, and may have held them. `samplepipe clean` "
                "(or remove_checkpoints) removes them.",
                CheckpointWarning,
                stacklevel=3,
            )
        computed = 0
        if todo:
            folder.fs.remove_stale_temporaries(folder.root)
            context.describe(wanted[0].step)
        size, budget = shard_limits(
            context.shard_size, context.shard_bytes, "CheckpointWrapper"
        )
        building = _Building(context, folder, wanted)
        position = 0
        while position < len(todo):
            room = building.room(size, budget)
            if room == 0:
                computed += building.write(found)
                continue
            chunk = todo[position : position + room]
            position += len(chunk)
            values = compute(chunk)  # the collector on
            with gc_paused():
                building.add(chunk, values)
                del values
                written = 0
                for end in split_points(building.sizes, size, budget)[:-1]:
                    computed += building.write(found, end - written)
                    written = end
        with gc_paused():
            computed += building.write(found)
        options = context.loader_options
        with gc_paused():
            n = len(wanted)
            entries = [entry_of(found[i]) if i in found else None for i in range(n)]
            loaders: list[Callable[[], Any] | None] = []
            if context.loaders:
                loaders = [
                    None
                    if entry is None
                    else _loader(found[i], options, wanted[i], entry)
                    for i, entry in enumerate(entries)
                ]
            if report is not None:
                shards = [found[i].shard if i in found else None for i in range(n)]
                report.fill(
                    TransformReport(
                        computed=computed,
                        loaded=len(found) - computed,
                        recomputed=sum(bad.values()),
                        failed=n - len(found),
                        step=wanted[0].step if wanted else None,
                        inputs=[i.inputs for i in wanted],
                        # the shard, its stamp and the entry: what manifests record
                        paths=[None if s is None else s.path for s in shards],
                        stamps=[None if s is None else s.stamp for s in shards],
                        entries=entries,
                    )
                )
        return loaders

    def judge_all(  # noqa: D102 - see Layout.judge_all
        self,
        context: LayoutContext,
        wanted: Sequence[Identity],
        loaders: bool = True,
        paths: Sequence[str] | None = None,
    ) -> list[Judged]:
        # A stale entry's record is that of the newest entry of its key.
        folder = folder_of(context)
        options = context.loader_options
        judged: list[Judged] = []
        for ident, result in zip(wanted, folder.find(wanted)):
            if isinstance(result, Found):
                loader = _loader(result, options, ident)
                judged.append((Status.VALID, result.record, loader))
                continue
            status = Status(result)  # storage.shards judges in bare strings
            record: str | None = None
            if status is Status.STALE:
                for _, path, position in folder.by_key.get(ident.key, ()):
                    index = folder.shards.get(path)
                    if index is not None and position < len(index.records):
                        record = index.records[position]
                        break
            if status is Status.STALE and record is None:  # its shard went in between
                status = Status.MISSING
            judged.append((status, record, None))
        return judged

    # -- the folder --------------------------------------------------------
    def walk(self, context: LayoutContext) -> Iterator[Walked]:
        """Shards and their temporaries, judged; any other file is ``unknown``."""
        for path, state, size, st in folder_of(context).judge(context.step()):
            yield path, Status(state), size, st  # storage.shards judges in strings
        for path, rel, size, _ in context.fs.walk_files(context.root):
            if "/" in rel or not (is_shard_name(rel) or is_shard_temporary(rel)):
                yield path, Status.UNKNOWN, size, None

    def remove(
        self, context: LayoutContext, statuses: Sequence[str], dry_run: bool
    ) -> list[tuple[str, Status, int]]:
        """Shards judged twice, removed if unchanged."""
        listed = [
            (path, state, size, st)
            for path, state, size, st in self.walk(context)
            if state in statuses
        ]
        if dry_run:
            return [(path, state, size) for path, state, size, _ in listed]
        again = {path: (state, st) for path, state, _, st in self.walk(context)}
        folder = folder_of(context)
        removed = []
        for path, state, size, st in listed:
            if again.get(path) != (state, st):
                continue  # a running job changed the picture in between
            if folder.remove(path, st):
                removed.append((path, state, size))
        return removed

    def compact(
        self,
        context: LayoutContext,
        shard_size: int | None = None,
        shard_bytes: int | str | None = None,
    ) -> dict[str, Any]:
        """Merge small shards (see `samplepipe.storage.shards.compact`)."""
        step = context.step()
        size, nbytes = shard_limits(
            context.shard_size if shard_size is None else shard_size,
            context.shard_bytes if shard_bytes is None else shard_bytes,
            "compact_checkpoints",
        )
        return folder_of(context).compact(size, step, nbytes)


class _Building:
    """The shard being built: computed, encoded entries not written yet."""

    def __init__(
        self,
        context: LayoutContext,
        folder: ShardFolder,
        identities: Sequence[Identity],
    ) -> None:
        self.context = context
        self.folder = folder
        self.identities = identities
        self.where: list[int] = []  # sample positions
        self.payloads: list[np.ndarray] = []
        self.kinds: list[str] = []
        self.sizes: list[int] = []
        self.samples = 0  # computed so far (failed ones too)
        self.nbytes = 0  # their payload bytes

    def room(self, size: int | None, budget: int) -> int:
        """How many samples to compute next: what fills this shard, by estimate."""
        count = len(self.where)
        if size is not None and count >= size:
            return 0
        if self.samples == 0:
            wanted = FIRST_SLICE if size is None else size
        else:
            per_sample = max(self.nbytes / self.samples, 1.0)
            wanted = int((budget - sum(self.sizes)) // per_sample)
            if wanted < 1:
                return 0 if count else 1
            # an estimate from few (or failed) samples grows the slices 4x at most
            wanted = min(wanted, max(FIRST_SLICE, 4 * self.samples))
        return max(1, min(wanted, size - count if size is not None else wanted))

    def add(self, chunk: Sequence[int], values: Mapping[int, Any]) -> None:
        """Encode the computed values of ``chunk`` (None: failed, not kept)."""
        self.samples += len(chunk)
        for i in chunk:
            value = values[i]
            if value is None:
                continue
            try:
                payload, kind = hdf5.encode(value)
            except TypeError as exc:
                key = self.identities[i].key
                msg = (
                    f"{self.context.name} cannot checkpoint "
                    f"the output of sample {key!r}: {exc} Nothing of its shard "
                    f"({len(self.where) + len(chunk)} samples) was written."
                )
                raise TypeError(msg) from exc
            self.where.append(i)
            self.payloads.append(payload)
            self.kinds.append(kind)
            self.sizes.append(payload.nbytes)
            self.nbytes += payload.nbytes

    def write(self, found: dict[int, Found], end: int | None = None) -> int:
        """Write the first ``end`` entries (all by default) as one shard."""
        end = len(self.where) if end is None else end
        if end == 0:
            return 0
        where = self.where[:end]
        chosen = [self.identities[i] for i in where]
        index = _write(
            self.context, self.folder, chosen, self.payloads[:end], self.kinds[:end]
        )
        for position, i in enumerate(where):
            found[i] = Found(index, position)
        del self.where[:end], self.payloads[:end], self.kinds[:end], self.sizes[:end]
        return end


def _write(
    context: LayoutContext,
    folder: ShardFolder,
    identities: list[Identity],
    payloads: list[np.ndarray],
    kinds: list[str],
) -> ShardIndex:
    """Write one shard, trying transient I/O errors ``attempts`` times."""
    last: OSError | None = None
    for attempt in range(context.attempts):
        try:
            return folder.write_new(identities, payloads, kinds)
        except OSError as exc:
            last = exc
            if is_permanent(exc) or attempt + 1 == context.attempts:
                break
            time.sleep(min(0.1 * 2**attempt, 2.0))
    msg = (
        f"CheckpointWrapper could not write a shard of {len(payloads)} samples "
        f"into {folder.root!r}: {last}"
    )
    raise OSError(getattr(last, "errno", None), msg) from last
