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

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.serializers import Serializer
from prefect.transactions import IsolationLevel

from .storage import (
    FORMAT_VERSION,
    CheckpointLoader,
    Identity,
    Stamp,
    estimator_identity,
    keys_digest,
)
from .wrappers import CheckpointWrapper
from .wrappers._checkpoint import failed_output, lazy_output

MANIFEST_FORMAT = 2
# Lock files shared by every process of this machine and user.
LOCK_DIR = Path(tempfile.gettempdir()) / f"samplepipe-locks-{os.getuid()}"


class StaleManifestError(ValueError):
    """A cached manifest names files that changed or disappeared since."""


class ManifestSerializer(Serializer):
    """JSON manifests that check, when read, that their files are unchanged.

    ``loads`` stats every file the manifest names (about 2 microseconds each)
    and raises `StaleManifestError` if one is missing or differs in size or
    modification time; Prefect then treats the cached result as missing.
    """

    type: str = "samplepipe-manifest"

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BaseException):  # Prefect persists a failed run's error
            obj = {"exception": type(obj).__name__, "message": str(obj)}
        return json.dumps(obj, separators=(",", ":")).encode()

    def loads(self, blob: bytes) -> Any:
        manifest = json.loads(blob)
        if "exception" in manifest:
            return RuntimeError(f"{manifest['exception']}: {manifest['message']}")
        check_manifest(manifest)
        return manifest


def check_manifest(manifest):
    """Raise `StaleManifestError` unless every named file is unchanged.

    A file is unchanged when its size, modification time, inode and change
    time are those recorded (a file swapped for another one is noticed).
    """
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StaleManifestError("manifest of another samplepipe version")
    root = manifest.get("root", "")
    entries = list(manifest.get("files") or [])
    if manifest.get("model") is not None:
        entries.append(manifest["model"])
    for entry in entries:
        if entry is None:
            continue
        name, recorded = entry[0], Stamp(*entry[1:5])
        path = os.path.join(root, name)
        try:
            st = Stamp.of(os.stat(path))
        except OSError as exc:
            raise StaleManifestError(f"{path} is gone") from exc
        if st != recorded:
            raise StaleManifestError(f"{path} changed since it was recorded")


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
        samples = inputs["samples"]
        method = getattr(task_ctx.task, "name", "task") if task_ctx else "task"
        parts = [
            f"manifest={MANIFEST_FORMAT}",
            f"format={FORMAT_VERSION}",
            f"task={method}",
            f"features_dir={os.path.abspath(os.fspath(step.features_dir or ''))}",
            f"model_path={os.path.abspath(os.fspath(step.model_path or ''))}",
        ]
        if method == "fit":
            parts += [
                f"estimator={estimator_identity(step.estimator)}",
                f"data={step.training_digest(samples)}",
                f"upstream={inputs.get('upstream')}",
            ]
        else:
            inputs = step.input_identities(samples)
            parts.append(f"step={step.step_identity()}")
            parts.append(
                "samples="
                + keys_digest(f"{s.key}={i}" for s, i in zip(samples, inputs))
            )
        return keys_digest(parts)


class CrashSafeFileLocks(FileSystemLockManager):
    """Prefect's file locks, where a lock of a dead process counts as released.

    Prefect's `FileSystemLockManager` keeps a lock until its holder releases it
    (or its hold timeout passes), and a holder is an anonymous UUID: a flow run
    killed while holding a lock would make every later run of that batch wait
    forever. This manager also writes the holding process (host and pid) into
    the lock file; a lock whose process no longer exists on this host is
    removed. Locks of other hosts are kept. A lock file without a process
    (written by another lock manager, or cut short by a crash) counts as stale
    once it is older than `STALE_SECONDS`.
    """

    STALE_SECONDS = 60.0
    # Prefect creates a lock file empty and writes it at once: an empty file
    # older than this was left by a process killed in between.
    EMPTY_STALE_SECONDS = 5.0

    def _get_lock_info(self, key, use_cache=True):
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # empty or cut short: held by an unknown process
            return {
                "holder": "",
                "expiration": None,
                "path": self._lock_path_for_key(key),
            }

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            info = self._locks[key]
            expiration = info.get("expiration")
            record = {
                "holder": holder,
                "expiration": str(expiration) if expiration is not None else None,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
            path = Path(info["path"])
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        return acquired

    def _holder_is_dead(self, key):
        path = self._lock_path_for_key(key)
        try:
            text = path.read_text()
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        try:
            record = json.loads(text)
        except ValueError:
            return age > self.EMPTY_STALE_SECONDS
        if "pid" not in record:
            return age > self.STALE_SECONDS
        if record.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        locked = super().is_locked(key, use_cache=use_cache)
        if locked and not use_cache and self._holder_is_dead(key):
            self._lock_path_for_key(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return locked


STEP_CACHE = StepCachePolicy(
    isolation_level=IsolationLevel.SERIALIZABLE,
    lock_manager=CrashSafeFileLocks(LOCK_DIR),
)


def retry_on_io_error(task, task_run, state):
    """Retry transient I/O errors (`OSError`); fail fast on anything else."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
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
):
    """Transform one batch through one checkpointed step; return its manifest."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {}
    step.transform_samples(samples, report=report)
    root = os.path.abspath(os.fspath(step.features_dir))
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": name,
        "start": start,
        "root": root,
        "identity": report["step"],
        "files": [
            None if f is None else [os.path.relpath(f[0], root), *f[1], inputs]
            for f, inputs in zip(report["files"], report["inputs"])
        ],
        "computed": report["computed"],
        "loaded": report["loaded"],
        "failed": report["failed"],
        "seconds": time.perf_counter() - t0,
    }
    get_run_logger().info(
        "%s[%d:%d]: computed %d, loaded %d from checkpoints, %d failed (None)",
        name,
        start,
        start + len(samples),
        report["computed"],
        report["loaded"],
        report["failed"],
    )
    return manifest


def fit_model(
    step: CheckpointWrapper,
    samples: list,
    name: str = "step",
    upstream: str | None = None,
):
    """Fit one step on all its training samples and save its model.

    ``upstream`` (the digest of the steps before this one) is recorded in the
    model file, so that a transform never mixes this model with other upstream
    models.
    """
    t0 = time.perf_counter()
    data = step.training_digest(samples)
    if step.force or not step.load_model(data=data, upstream=upstream):
        step.estimator.fit(samples)
        step.save_model(data=data, upstream=upstream)
        fitted = True
    else:
        fitted = False
    st = Stamp.of(os.stat(step.model_path))
    get_run_logger().info("%s: %s", name, "fitted" if fitted else "model loaded")
    return {
        "format": MANIFEST_FORMAT,
        "step": name,
        "model": (os.path.abspath(step.model_path), *st),
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


def samples_from_manifest(manifest, inputs, step):
    """Output samples of a batch: lazy loaders of its files, metadata of inputs.

    Raises `StaleManifestError` unless the manifest names exactly this batch's
    files, in order.
    """
    root = manifest["root"]
    entries = manifest["files"]
    if len(entries) != len(inputs):
        msg = f"manifest names {len(entries)} files for {len(inputs)} samples"
        raise StaleManifestError(msg)
    _, load_func = step._funcs()
    attribute = step._sample_attribute()
    out = []
    for s, entry in zip(inputs, entries):
        if entry is None:
            out.append(failed_output(s, attribute))
            continue
        name, size, mtime_ns, ino, ctime_ns, inputs_digest = entry
        path = os.path.join(root, name)
        if os.path.normpath(path) != os.path.abspath(step.checkpoint_path(s.key)):
            msg = f"manifest names {path!r} for sample {s.key!r}"
            raise StaleManifestError(msg)
        identity = Identity(manifest["identity"], inputs_digest, s.key)
        stamp_ = Stamp(size, mtime_ns, ino, ctime_ns)
        out.append(
            lazy_output(
                s, attribute, CheckpointLoader(path, identity, stamp_, load_func)
            )
        )
    return out
