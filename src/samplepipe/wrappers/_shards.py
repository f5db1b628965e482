"""CheckpointWrapper with ``layout="shards"``: transform, list, clean, compact.

The storage side (the shard format, the per-process index, lazy loaders) is
`samplepipe.storage.shards`; this module is what the wrapper does with it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage import hdf5
from ..storage.files import is_permanent
from ..storage.shards import (
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

if TYPE_CHECKING:
    from ._checkpoint import CheckpointWrapper


_GC_LOCK = threading.Lock()
_GC_PAUSES = [0, False]  # how many pauses are running; whether gc was enabled


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while samplepipe builds objects.

    Building a batch's identities, index lookups and output samples makes a
    few objects per sample, none of them cyclic; with the collector running,
    its full passes over every live object took a third of a re-run's time
    (10,000 samples). Only samplepipe's own bookkeeping runs paused, never the
    wrapped estimator. Nested and concurrent pauses (threads) re-enable the
    collector once, when the last one ends, and only if it was enabled.
    """
    with _GC_LOCK:
        if _GC_PAUSES[0] == 0:
            _GC_PAUSES[1] = gc.isenabled()
            gc.disable()
        _GC_PAUSES[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES[0] -= 1
            if _GC_PAUSES[0] == 0 and _GC_PAUSES[1]:
                gc.enable()


def folder_of(wrapper: CheckpointWrapper) -> ShardFolder:
    """The `ShardFolder` of a wrapper's ``features_dir``."""
    return shard_folder(
        wrapper._features_root(),
        wrapper.storage_options,
        wrapper._features_fs(),
    )


def entry_of(found: Found) -> tuple[int, int, str, str]:
    """``(group, row, checksum, kind)`` of a found entry (see `ShardLoader`)."""
    index, position = found
    checksums, kinds = index.fields()
    group, row = index.locations()[position]
    return group, row, checksums[position], kinds[position]


def _loader(found: Found, options: Any, identity: Any) -> ShardLoader:
    index = found[0]
    return ShardLoader.make(index.path, identity, index.stamp, options, entry_of(found))


def transform_samples(
    wrapper: CheckpointWrapper, samples: Sequence[Any], report: dict | None
) -> list[Any]:
    """`CheckpointWrapper.transform_samples` for the sharded layout.

    Valid entries are loaded lazily; the rest is computed in slices sized to
    fill one shard (``shard_size`` samples, ``shard_bytes`` of payload,
    estimated from the outputs so far), each shard written as soon as it is
    full (a crash loses at most the shard being built).
    """
    from ._checkpoint import CheckpointWarning, _is_failed, failed_output, lazy_output

    with gc_paused():
        identities = wrapper.identities(samples)
        attribute = wrapper._sample_attribute()
        input_attribute = wrapper._sample_wrapper_option("input_attribute")
        folder = folder_of(wrapper)
        live = [i for i, s in enumerate(samples) if not _is_failed(s, input_attribute)]
        if wrapper.force:
            results: list[Found | str] = ["missing"] * len(live)
        else:
            results = folder.find([identities[i] for i in live])
    found: dict[int, Found] = {}
    todo: list[int] = []
    bad: dict[str, int] = {}
    for i, result in zip(live, results):
        if isinstance(result, Found):
            found[i] = result
            continue
        todo.append(i)
        if result != "missing":
            bad[result] = bad.get(result, 0) + 1
    if bad:
        wrapper._warn_recomputed(bad, "corrupt: failing its checksum", stacklevel=4)
    unreadable = [p for p, index in folder.shards.items() if index.status == "corrupt"]
    if todo and unreadable:
        # an unreadable shard's keys are unknown: its samples look missing
        warnings.warn(
            f"CheckpointWrapper({wrapper._name()}) computes {len(todo)} "
            f"checkpoint(s) in {wrapper._features_root()!r} that no readable shard "
            f"holds; {len(unreadable)} shard(s) there are unreadable (corrupt), "
            f"e.g. {unreadable[0]!r}, and may have held them. `samplepipe clean` "
            "(or remove_checkpoints) removes them.",
            CheckpointWarning,
            stacklevel=3,
        )
    computed = 0
    if todo:
        folder.fs.remove_stale_temporaries(folder.root)
        wrapper._describe(identities[0].step)
    size, budget = shard_limits(
        wrapper.shard_size, wrapper.shard_bytes, "CheckpointWrapper"
    )
    building = _Building(wrapper, folder, identities)
    position = 0
    while position < len(todo):
        room = building.room(size, budget)
        if room == 0:
            computed += building.write(found)
            continue
        chunk = todo[position : position + room]
        position += len(chunk)
        values = wrapper._compute(samples, chunk, attribute)  # the collector on
        with gc_paused():
            building.add(chunk, values)
            del values
            written = 0
            for end in split_points(building.sizes, size, budget)[:-1]:
                computed += building.write(found, end - written)
                written = end
    with gc_paused():
        computed += building.write(found)
    outputs = []
    options = None if folder.fs.local else wrapper.storage_options
    with gc_paused():
        for i, s in enumerate(samples):
            if i in found:
                loader = _loader(found[i], options, identities[i])
                outputs.append(lazy_output(s, attribute, loader))
            else:
                outputs.append(failed_output(s, attribute))
    if report is not None:
        report["computed"] = computed
        report["loaded"] = len(found) - computed
        report["recomputed"] = sum(bad.values())
        report["failed"] = len(samples) - len(found)
        report["step"] = identities[0].step if identities else None
        report["inputs"] = [i.inputs for i in identities]
        # (shard, its stamp, the entry): what the flows' manifests record
        report["files"] = [
            (found[i].shard.path, found[i].shard.stamp, entry_of(found[i]))
            if i in found
            else None
            for i in range(len(samples))
        ]
    return outputs


# the first slice of a run, before the size of an output is known
FIRST_SLICE = 100


class _Building:
    """The shard being built: computed, encoded entries not written yet."""

    def __init__(
        self, wrapper: CheckpointWrapper, folder: ShardFolder, identities: list[Any]
    ) -> None:
        self.wrapper = wrapper
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

    def add(self, chunk: Sequence[int], values: dict[int, Any]) -> None:
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
                    f"CheckpointWrapper({self.wrapper._name()}) cannot checkpoint "
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
            self.wrapper, self.folder, chosen, self.payloads[:end], self.kinds[:end]
        )
        for position, i in enumerate(where):
            found[i] = Found(index, position)
        del self.where[:end], self.payloads[:end], self.kinds[:end], self.sizes[:end]
        return end


def _write(
    wrapper: CheckpointWrapper,
    folder: ShardFolder,
    identities: list[Any],
    payloads: list[np.ndarray],
    kinds: list[str],
) -> ShardIndex:
    """Write one shard, trying transient I/O errors ``attempts`` times."""
    last: OSError | None = None
    for attempt in range(wrapper.attempts):
        try:
            return folder.write_new(identities, payloads, kinds)
        except OSError as exc:
            last = exc
            if is_permanent(exc) or attempt + 1 == wrapper.attempts:
                break
            time.sleep(min(0.1 * 2**attempt, 2.0))
    msg = (
        f"CheckpointWrapper could not write a shard of {len(payloads)} samples "
        f"into {folder.root!r}: {last}"
    )
    raise OSError(getattr(last, "errno", None), msg) from last


def judge_all(
    wrapper: CheckpointWrapper, wanted: Sequence[Any], options: Any
) -> list[tuple[str, str | None, Any]]:
    """`CheckpointWrapper._judge_all`: each entry's status, record and loader.

    A stale entry's record is that of the newest entry of its key.
    """
    folder = folder_of(wrapper)
    judged: list[tuple[str, str | None, Any]] = []
    for ident, result in zip(wanted, folder.find(wanted)):
        if isinstance(result, Found):
            loader = _loader(result, options, ident)
            judged.append(("valid", result.record, loader))
            continue
        record: str | None = None
        if result == "stale":
            for _, path, position in folder.by_key.get(ident.key, ()):
                index = folder.shards.get(path)
                if index is not None and position < len(index.records):
                    record = index.records[position]
                    break
        if result == "stale" and record is None:  # its shard went in between
            result = "missing"
        judged.append((result, record, None))
    return judged


def walk(wrapper: CheckpointWrapper) -> Any:
    """``(path, status, size, stamp)`` of every file (`iter_checkpoints`).

    Shards and their temporaries are judged; any other file under
    ``features_dir`` is ``unknown`` (never removed).
    """
    step = wrapper.step_identity() if wrapper._has_model_state() else None
    yield from folder_of(wrapper).judge(step)
    fs = wrapper._features_fs()
    for path, rel, size, _ in fs.walk_files(wrapper._features_root()):
        if "/" in rel or not (is_shard_name(rel) or is_shard_temporary(rel)):
            yield path, "unknown", size, None


def remove(
    wrapper: CheckpointWrapper, statuses: Sequence[str], dry_run: bool
) -> list[tuple[str, str, int]]:
    """`remove_checkpoints` for shards: judged twice, removed if unchanged."""
    listed = [
        (path, state, size, st)
        for path, state, size, st in walk(wrapper)
        if state in statuses
    ]
    if dry_run:
        return [(path, state, size) for path, state, size, _ in listed]
    again = {path: (state, st) for path, state, _, st in walk(wrapper)}
    folder = folder_of(wrapper)
    removed = []
    for path, state, size, st in listed:
        if again.get(path) != (state, st):
            continue  # a running job changed the picture in between
        if folder.remove(path, st):
            removed.append((path, state, size))
    return removed


def compact(
    wrapper: CheckpointWrapper, shard_size: int | None, shard_bytes: int | str | None
) -> dict[str, Any]:
    """`CheckpointWrapper.compact_checkpoints`."""
    step = wrapper.step_identity() if wrapper._has_model_state() else None
    size, nbytes = shard_limits(
        wrapper.shard_size if shard_size is None else shard_size,
        wrapper.shard_bytes if shard_bytes is None else shard_bytes,
        "compact_checkpoints",
    )
    return folder_of(wrapper).compact(size, step, nbytes)
