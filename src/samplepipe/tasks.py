"""Wrapped pipeline steps as Prefect tasks: cache policy, manifests, retries.

One task run transforms one batch of samples through one step; one task run
fits one step. The persisted result of a task run is a small JSON *manifest*
naming the step's checkpoint files (with their size and modification time);
the arrays themselves live only in the HDF5 checkpoints. When a cached
manifest no longer matches the files on disk, reading it fails, Prefect treats
the cache entry as missing, and the task runs again: it then loads every valid
per-sample checkpoint and computes only the missing ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.serializers import Serializer
from prefect.transactions import IsolationLevel

from ._manifest import MANIFEST_FORMAT as MANIFEST_FORMAT
from ._manifest import BatchManifest as BatchManifest
from ._manifest import layout_kind, layout_token
from ._prefect import unquoted as unquoted
from .errors import SampleFailures as SampleFailures
from .errors import StaleManifestError as StaleManifestError
from .locks import default_lock_dir, lock_manager_from_url
from .sources import await_turn, read_samples
from .storage import (
    FORMAT_VERSION,
    Stamp,
    TransformReport,
    combine,
    estimator_identity,
    filesystem,
    is_permanent,
    is_url,
    keys_digest,
    normalize_location,
    stamp_of,
)
from .wrappers import CheckpointWrapper, attribute_identity

# Lock files shared by every process of this machine and user.
LOCK_DIR = default_lock_dir()  # file locks shared by this machine's processes


class ManifestSerializer(Serializer):
    """JSON manifests that check, when read, that their files are unchanged.

    ``loads`` stats every file the manifest names (about 2 microseconds each)
    and raises `StaleManifestError` if one is missing or differs in size or
    modification time; Prefect then treats the cached result as missing.
    """

    type: str = "samplepipe-manifest"

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BatchManifest):
            return obj.to_bytes()
        if isinstance(obj, BaseException):  # Prefect persists a failed run's error
            obj = {
                "exception": type(obj).__name__,
                "message": str(obj),
                "failures": getattr(obj, "failures", None),
            }
        return json.dumps(obj, separators=(",", ":")).encode()

    def loads(self, blob: bytes) -> Any:
        run = _task_run_id()
        last = getattr(_CHECKED, "last", None)
        _CHECKED.last = None
        if run is not None and last is not None and last[:2] == (run, blob):
            return last[2]  # checked a moment ago, in this task run (below)
        manifest: Any
        if blob.startswith(b"samplepipe-manifest-"):
            manifest = BatchManifest.from_bytes(blob)
            if manifest.errors:
                # failed samples are tried again on the next run, never served cached
                raise StaleManifestError("the batch had failed samples")
        else:
            manifest = json.loads(blob)
            if "exception" in manifest:
                if manifest.get("failures") is not None:
                    return SampleFailures(manifest["message"], manifest["failures"])
                return RuntimeError(f"{manifest['exception']}: {manifest['message']}")
        check_manifest(manifest)
        if run is not None:
            _CHECKED.last = (run, blob, manifest)
        return manifest


# Prefect reads a cached result twice per cache lookup, a moment apart in the
# same task run and thread: `ResultStore.exists`, then the transaction's read.
# The second read of the same bytes uses the manifest the first one parsed and
# checked (one ``os.stat`` per file per lookup, not two); any other read checks.
_CHECKED = threading.local()


def _task_run_id() -> UUID | None:
    context = TaskRunContext.get()
    return None if context is None else context.task_run.id


# Flow runs of this process whose transform tasks hold their data one at a time
# (see `one_batch_holds_data`): flow run id -> the slot.
_DATA_SLOTS: dict[UUID, threading.Lock] = {}


@contextlib.contextmanager
def one_batch_holds_data(flow_run_id: UUID | None) -> Iterator[None]:
    """Within the block, this flow run's transform tasks in *this process*
    compute and write one batch at a time.

    Other batches in flight meanwhile do what holds no data: Prefect's state
    changes, cache lookups, manifests. A batch holds about two copies of its
    data while its step computes (the stacked input and the output) and one
    while its outputs are written, so the data in memory stays about two
    batches whatever ``max_batches_in_flight``. Tasks in other processes (Dask
    workers) are not held back: their memory is the worker's to manage.

    On glibc, the first such block of a process fixes malloc's mmap threshold
    (`_large_arrays_return_their_memory`) and each batch ends with
    ``malloc_trim``, so that the memory a batch frees leaves the process.
    """
    if flow_run_id is None:
        yield
        return
    _large_arrays_return_their_memory()
    _DATA_SLOTS[flow_run_id] = threading.Lock()
    try:
        yield
    finally:
        _DATA_SLOTS.pop(flow_run_id, None)


@contextlib.contextmanager
def _data_slot() -> Iterator[None]:
    """Hold the slot of this task's flow run (see `one_batch_holds_data`).

    On leaving, the C allocator gives the pages that the batch freed back to
    the operating system, as Dask's "trim memory" recipe does; otherwise the
    per-sample arrays freed in each task thread's malloc arena stay resident
    (about a batch per thread).
    """
    context = TaskRunContext.get()
    slot = None
    if context is not None and context.task_run.flow_run_id is not None:
        slot = _DATA_SLOTS.get(context.task_run.flow_run_id)
    if slot is None:
        yield
        return
    with slot:
        try:
            yield
        finally:
            _malloc_trim()


def _glibc() -> Any:
    """The C library when it is glibc (``malloc_trim``, ``mallopt``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (
            [ctypes.c_size_t],
            ctypes.c_int,
        )
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl, or no C library found
        return None
    return libc


_GLIBC = _glibc()
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from <malloc.h>
#: Allocations from this size up get pages of their own, returned when freed.
MMAP_THRESHOLD = 1 << 20
_ALLOCATOR_SET = False


def _malloc_trim() -> None:
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def _large_arrays_return_their_memory() -> None:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` (1 MiB), once per process.

    By default glibc raises the threshold to the size of each large block freed
    (up to 32 MiB), so after the first batch a batch-sized array comes from the
    heap and its pages stay resident once freed: measured, the peak RSS of a
    10,000 x 4096 flow went from 1.8 to 3.9 batches above the fixed cost. This
    is what ``MALLOC_MMAP_THRESHOLD_=1048576`` does; a process started with
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` set keeps its own
    settings.
    """
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET or _GLIBC is None:
        return
    _ALLOCATOR_SET = True
    if not _set_at_start(("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _set_at_start(names: tuple[str, ...]) -> bool:
    """Whether one of ``names`` was in the environment this process started with.

    glibc reads its variables then; one set later (Dask's nanny sets
    ``MALLOC_TRIM_THRESHOLD_`` in the process that starts a cluster) changes
    nothing.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            start = f.read().split(b"\0")
    except OSError:
        return any(name in os.environ for name in names)
    prefixes = tuple(name.encode() + b"=" for name in names)
    return any(item.startswith(prefixes) for item in start)


def check_manifest(
    manifest: BatchManifest | dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    *,
    stored: bool = False,
) -> None:
    """Raise `StaleManifestError` unless every file a manifest names is unchanged.

    By default only local files are checked, one ``os.stat`` each (what
    `ManifestSerializer` does when Prefect reads a cached result: it knows no
    ``storage_options``). With ``stored=True`` only the files at URLs are
    checked, one ``HEAD`` request each, with ``storage_options``.

    A file is unchanged when its size, modification time, inode and change
    time are those recorded (a file swapped for another one is noticed).
    """
    if isinstance(manifest, BatchManifest):
        manifest.check_files(storage_options, stored=stored)
        return
    if manifest.get("format") != MANIFEST_FORMAT or "model" not in manifest:
        raise StaleManifestError("manifest of another samplepipe version")
    path, *recorded = manifest["model"]
    if is_url(path) != stored:
        return
    try:
        st = stamp_of(path, storage_options) if stored else Stamp.of(os.stat(path))
    except OSError as exc:
        raise StaleManifestError(f"{path} is gone") from exc
    if st is None:
        raise StaleManifestError(f"{path} is gone")
    if st != Stamp(*recorded):
        raise StaleManifestError(f"{path} changed since it was recorded")


def inputs_of(samples: Sequence[Any], upstream: Sequence[Any] = ()) -> list[Any]:
    """A step's input samples: a batch's samples through its upstream manifests.

    ``upstream`` is ``[(step, manifest), ...]`` of the steps before this one,
    in order; each replaces the attribute its step checkpoints with a lazy
    loader of its checkpoint (`BatchManifest.samples`).
    """
    current = list(samples)
    for step, manifest in upstream:
        current = manifest.samples(current, step)
    return current


def batch_identity(
    step: CheckpointWrapper,
    samples: Sequence[Any],
    upstream: Sequence[Any] = (),
    fingerprint: str | None = None,
) -> tuple[str, list[str] | None]:
    """``(digest, per-sample input identities or None)`` of a batch's inputs.

    An attribute the step reads that a step before it checkpointed counts by
    that step's manifest digest (`BatchManifest.chain_digest`: every output's
    key and identity, in order): no sample is visited. The others count by
    the batch's ``fingerprint`` when its source gives one (see
    `samplepipe.sources`; it covers every key and attribute of the batch), or
    else by each sample's `attribute_identity`. With neither an upstream
    manifest nor a fingerprint involved, the per-sample identities are
    returned too (the transform uses them).
    """
    attributes = step.read_attributes()
    last: dict[str, BatchManifest] = {}
    for _, manifest in upstream:
        last[manifest.attribute] = manifest
    if fingerprint is None and not any(a in last for a in attributes):
        ids = step.input_identities(samples)
        return keys_digest(f"{s.key}={i}" for s, i in zip(samples, ids)), ids
    parts = ["chained"]
    for attribute in attributes:
        manifest = last.get(attribute)
        if manifest is not None:
            parts.append(f"{attribute}<{manifest.digest}")
        elif fingerprint is not None:
            parts.append(f"{attribute}@{fingerprint}")
        else:
            parts.append(
                f"{attribute}="
                + keys_digest(
                    f"{s.key}={attribute_identity(s, attribute)}" for s in samples
                )
            )
    return combine(*parts), None


@dataclass
class StepCachePolicy(CachePolicy):
    """Cache key of a step's task run, from identities, never from pickles.

    For ``transform``, the key hashes: the manifest and checkpoint formats; the
    step's identity (its code, parameters, checkpointed attribute, file format
    and fitted state, see `CheckpointWrapper.step_identity`); ``features_dir``
    and ``model_path``; and each sample's key and input identity (the identity
    of the checkpoint it loads from, or a digest of its in-memory data and
    metadata). For ``fit``, the step's code and parameters, the digest of the
    training samples and of the steps before it. A cache hit is therefore
    exactly a batch whose checkpoints a fresh run would reproduce.
    """

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        step = inputs["step"]
        samples = unquoted(inputs["samples"])
        method = getattr(task_ctx.task, "name", "task") if task_ctx else "task"
        parts = [
            f"manifest={MANIFEST_FORMAT}",
            f"format={FORMAT_VERSION}",
            f"task={method}",
            f"on_error={inputs.get('on_error', 'raise')}",
            f"features_dir={normalize_location(step.features_dir or '')}",
            f"model_path={normalize_location(step.model_path or '')}",
            f"store={_store_token(step)}",
            f"layout={layout_token(step)}",
        ]
        if method == "fit":
            parts += [
                f"estimator={estimator_identity(step.estimator)}",
                f"data={step.training_digest(samples)}",
                f"upstream={inputs.get('upstream')}",
            ]
        else:
            given = unquoted(inputs.get("identities"))
            if given is None:
                upstream = unquoted(inputs.get("upstream")) or ()
                inputs_ = inputs_of(read_samples(samples), upstream)
                step_id = step.step_identity()
                digest, _ = batch_identity(step, inputs_, upstream)
            else:  # computed once by the flow (see transform_batch)
                step_id, digest = given[0], given[1]
            parts.append(f"step={step_id}")
            parts.append(f"samples={digest}")
        return keys_digest(parts)


def _store_token(step: CheckpointWrapper) -> str:
    """Tells object stores apart (endpoint, options); empty for local paths.

    Two stores may hold the same URL: fsspec's token of the filesystem, built
    from the protocol and ``storage_options``, tells them apart.
    """
    for location in (step.features_dir, step.model_path):
        if location is not None and is_url(location):
            return filesystem(location, step.storage_options).token
    return ""


def step_cache_policy(locks: str | LockManager | None = None) -> StepCachePolicy:
    """The cache policy of the step tasks, with the lock manager of ``locks``.

    ``locks`` is a lock manager (any ``prefect.locking.protocol.LockManager``,
    used as it is) or a lock URL (see `samplepipe.locks.lock_manager_from_url`):
    None reads ``SAMPLEPIPE_LOCKS`` (unset: file locks on this host).
    """
    manager = locks if isinstance(locks, LockManager) else lock_manager_from_url(locks)
    return StepCachePolicy(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=manager,
    )


STEP_CACHE = step_cache_policy()


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O errors; fail fast on anything else.

    The same rule as `CheckpointWrapper`'s own retries
    (`samplepipe.storage.is_permanent`): an `OSError` is retried unless retrying
    cannot fix it (a full disk, missing permissions, a folder or file in the
    way, a read-only filesystem, ...).
    """
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own error, classified
        return not is_permanent(exc)
    return False


def _task_options(fn):
    return task(
        fn,
        cache_policy=STEP_CACHE,
        persist_result=True,
        result_serializer=ManifestSerializer(),
        cache_result_in_memory=False,
        retry_condition_fn=retry_on_io_error,
    )


def transform_batch(
    step: CheckpointWrapper,
    samples: list,
    name: str = "step",
    start: int = 0,
    stop: int | None = None,
    on_error: str = "raise",
    identities: tuple[str, str, list[str] | None] | None = None,
    upstream: list[tuple[CheckpointWrapper, BatchManifest]] | None = None,
) -> BatchManifest:
    """Transform one batch through one checkpointed step; return its manifest.

    ``samples`` are the batch's samples as the flow read them; ``upstream``
    the ``(step, manifest)`` of each step before this one for this batch: the
    step's inputs are the samples through those manifests (`inputs_of`).

    ``identities`` is ``(step.step_identity(), digest, per-sample input
    identities or None)`` (see `batch_identity`) when the caller computed them
    already: the cache key and the transform then use these instead of
    hashing the step and the inputs again. None computes them here.

    When the batch fails, the samples that fail are isolated by bisecting the
    batch; every other sample is checkpointed. With ``on_error="raise"`` the
    task then fails with `SampleFailures` naming the failed keys; with
    ``"skip"`` it completes, the failed samples kept in line with ``data=None``.
    An `OSError` is not bisected: the task fails and Prefect retries it.
    """
    t0 = time.perf_counter()
    samples, identities = unquoted(samples), unquoted(identities)
    if step.features_dir is None:
        msg = f"step {name!r} has no features_dir: it has nowhere to checkpoint."
        raise ValueError(msg)
    given = None
    if identities is not None and identities[2] is not None:
        given = (identities[0], identities[2])
    # the batches before an unread one settle their keys first (outside the
    # slot, which they may need); then it is read holding the slot, so that
    # one batch's samples at a time are made in this process
    await_turn(samples)
    with _data_slot():
        inputs = inputs_of(read_samples(samples), unquoted(upstream) or ())
        report, errors = _transform_isolating(step, inputs, given)
        keys = [s.key for s in inputs]
        del inputs
    stop = start + len(keys) if stop is None else stop
    manifest = BatchManifest.from_report(
        report,
        keys,
        step=name,
        start=start,
        root=normalize_location(step.features_dir),
        layout=layout_kind(step),
        attribute=step.checkpointed_attribute(),
        errors=errors,
        seconds=time.perf_counter() - t0,
    )
    logger = get_run_logger()
    logger.info(
        "%s[%d:%d]: computed %d, loaded %d from checkpoints, %d failed",
        name,
        start,
        stop,
        report.computed,
        report.loaded,
        report.failed,
    )
    for key, error in errors:
        logger.error("%s[%d:%d]: sample %r failed: %s", name, start, stop, key, error)
    if errors and on_error == "raise":
        named = ", ".join(repr(k) for k, _ in errors[:5])
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        msg = (
            f"step {name!r}, batch [{start}:{stop}]: {len(errors)} sample(s) failed: "
            f"{named}{more} (first error: {errors[0][1]}); the other "
            f"{len(keys) - len(errors)} are checkpointed."
        )
        raise SampleFailures(msg, errors)
    return manifest


def _transform_isolating(
    step: CheckpointWrapper,
    samples: Sequence[Any],
    identities: tuple[str, list[str]] | None = None,
) -> tuple[TransformReport, list[list[str]]]:
    """``(report, errors)`` of a batch, bisecting it around failing samples."""
    report = TransformReport()
    try:
        step.checkpoint_samples(samples, report=report, identities=identities)
        return report, []
    except OSError:
        raise  # I/O: the whole task is retried
    except Exception as exc:  # noqa: BLE001 - isolated below, reported per key
        if len(samples) == 1:
            key = getattr(samples[0], "key", "?")
            return TransformReport.failed_sample(), [
                [key, f"{type(exc).__name__}: {exc}"]
            ]
    half = len(samples) // 2
    left_ids = right_ids = None
    if identities is not None:
        left_ids = (identities[0], identities[1][:half])
        right_ids = (identities[0], identities[1][half:])
    left, left_errors = _transform_isolating(step, samples[:half], left_ids)
    right, right_errors = _transform_isolating(step, samples[half:], right_ids)
    left.extend(right)
    return left, left_errors + right_errors


def fit_model(
    step: CheckpointWrapper,
    samples: list,
    name: str = "step",
    upstream: str | None = None,
) -> dict[str, Any]:
    """Fit one step on all its training samples and save its model.

    ``upstream`` (the digest of the steps before this one) is recorded in the
    model file, so that a transform never mixes this model with other upstream
    models.
    """
    t0 = time.perf_counter()
    samples = unquoted(samples)
    model_path = step.model_path
    if model_path is None:
        msg = f"step {name!r} has no model_path: it has nowhere to save its model."
        raise ValueError(msg)
    fitted = step.fit_or_load(samples, upstream=upstream)
    st = stamp_of(model_path, step.storage_options)
    if st is None:  # pragma: no cover - removed by someone else right away
        msg = f"step {name!r}: the model at {model_path!r} vanished once saved."
        raise FileNotFoundError(msg)
    get_run_logger().info("%s: %s", name, "fitted" if fitted else "model loaded")
    return {
        "format": MANIFEST_FORMAT,
        "step": name,
        "model": (normalize_location(model_path), *st),
        "state": step.fitted_digest_,
        "fitted": fitted,
        "n_samples": len(samples),
        "seconds": time.perf_counter() - t0,
    }


transform_step = _task_options(transform_batch).with_options(
    name="transform", task_run_name="{name}.transform[{start}:{stop}]"
)
transform_step.__doc__ = transform_batch.__doc__

fit_step = _task_options(fit_model).with_options(name="fit", task_run_name="{name}.fit")
fit_step.__doc__ = fit_model.__doc__


def samples_from_manifest(
    manifest: BatchManifest, inputs: list[Any], step: CheckpointWrapper
) -> list[Any]:
    """Output samples of a batch (`BatchManifest.samples`)."""
    return manifest.samples(inputs, step)
