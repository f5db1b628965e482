"""Prefect flows that fit and transform whole pipelines, batch by batch.

Each step of the pipeline is wrapped for samples and checkpoints; each batch of
samples becomes one cached task run per step (see `samplepipe.tasks`). Use
another task runner with ``fit_pipeline.with_options(task_runner=...)``, e.g.
``prefect_dask.DaskTaskRunner(address=...)``.
"""

from __future__ import annotations

import copy
import errno
import os
import pkgutil
import time
from dataclasses import dataclass, replace
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.locking.protocol import LockManager
from sklearn.pipeline import Pipeline

from ._factory import is_factory
from ._prefect import SampleFlow as SampleFlow
from ._prefect import returned, sample_flow, unvisited
from ._prefect import summarize_parameter as summarize_parameter
from .errors import PipelineRunError as PipelineRunError
from .errors import SourceError
from .locks import lock_manager_from_url
from .outputs import PipelineOutputs
from .server import api_for_tasks
from .sources import DEFAULT_BATCH, as_source, estimate_batch_size
from .storage import (
    check_location,
    check_step_name,
    combine,
    fitted_digest,
    is_url,
    join_location,
    location_root,
)
from .tasks import (
    SampleFailures,
    StaleManifestError,
    batch_identity,
    fit_step,
    one_batch_holds_data,
    step_cache_policy,
    transform_step,
)
from .wrappers import CheckpointWrapper, DaskWrapper, SampleWrapper, ToDaskBag
from .wrappers._base import estimator_requires_fit
from .wrappers._method import PREDICTION_METHODS, UseMethod, available_methods

ON_ERROR = ("raise", "skip")
LAYOUTS = ("files", "shards")


@dataclass(frozen=True)
class RunOptions:
    """The options every flow passes down to its steps, checked once.

    Attributes
    ----------
    features_dir, model_dir : str
        Where checkpoints and models go: local folders or fsspec URLs.
    storage_options : dict or None
        Passed to fsspec for URLs (steps that have their own keep theirs).
    batch_size : int or None
        Samples per task run; None: about 64 MiB of input per batch (a
        stream's own batches).
    retries, retry_delay_seconds : int, float
        Retries of task runs that failed with a transient I/O error.
    max_batches_in_flight : int
        Batches of one step that run at once.
    method : str
        What the last step computes: ``"transform"``, ``"predict"``,
        ``"predict_proba"``, ``"predict_log_proba"``, ``"decision_function"``
        or ``"score_samples"``.
    on_error : str
        ``"raise"``: a flow run with failed samples fails (after every other
        sample is checkpointed); ``"skip"``: it completes, failed samples kept
        in line with ``data=None``.
    locks : str, LockManager or None
        Where the per-batch locks live: a lock manager object (any
        ``prefect.locking.protocol.LockManager``, such as
        `samplepipe.locks.CrashSafeFileLocks` or `samplepipe.locks.RedisLocks`),
        used as it is; or a URL (`samplepipe.locks.lock_manager_from_url`):
        None reads ``SAMPLEPIPE_LOCKS`` (unset: file locks on this host),
        ``"redis://host:port/db"`` for several hosts.
    layout : str
        ``"files"`` or ``"shards"``, for the steps the flow wraps itself.
    """

    features_dir: str
    model_dir: str
    batch_size: int | None = None
    retries: int = 2
    retry_delay_seconds: float = 1.0
    max_batches_in_flight: int = 2
    method: str = "transform"
    on_error: str = "raise"
    locks: str | LockManager | None = None
    storage_options: dict[str, Any] | None = None
    layout: str = "files"

    def check(self) -> RunOptions:
        for name in ("batch_size", "max_batches_in_flight"):
            value = getattr(self, name)
            if value is None and name == "batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be an int >= 1, got {value!r}."
                raise ValueError(msg)
        if not isinstance(self.retries, int) or self.retries < 0:
            msg = f"retries must be an int >= 0, got {self.retries!r}."
            raise ValueError(msg)
        if self.method not in PREDICTION_METHODS:
            msg = f"method={self.method!r} is not one of {list(PREDICTION_METHODS)}."
            raise ValueError(msg)
        if isinstance(self.locks, str):
            lock_manager_from_url(self.locks)  # a clear error for a bad URL, now
        elif self.locks is not None and not isinstance(self.locks, LockManager):
            msg = (
                f"locks must be a lock URL (e.g. 'redis://host:6379/0'), a lock "
                "manager implementing prefect.locking.protocol.LockManager (e.g. "
                "samplepipe.locks.CrashSafeFileLocks('/a/folder')) or None, got "
                f"{type(self.locks).__name__} {self.locks!r}."
            )
            raise TypeError(msg)
        if self.on_error not in ON_ERROR:
            msg = f"on_error={self.on_error!r} is not one of {list(ON_ERROR)}."
            raise ValueError(msg)
        for name in ("features_dir", "model_dir"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike):
                msg = f"{name} must be a folder path or URL, got {value!r}."
                raise TypeError(msg)
            check_location(value, name, owner="the flow")
        if self.layout not in LAYOUTS:
            msg = f"layout={self.layout!r} is not one of {list(LAYOUTS)}."
            raise ValueError(msg)
        if self.storage_options is not None and not isinstance(
            self.storage_options, dict
        ):
            msg = (
                f"storage_options must be a dict of fsspec options, got "
                f"{self.storage_options!r}."
            )
            raise TypeError(msg)
        return self

    def task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "retries": self.retries,
            "retry_delay_seconds": self.retry_delay_seconds,
        }
        if self.locks is not None:
            options["cache_policy"] = step_cache_policy(self.locks)
        return options


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def load_object(
    spec: Any, kwargs: dict[str, Any] | None = None, what: str = "object"
) -> Any:
    """Resolve ``"package.module:name"`` (called with ``kwargs`` if callable).

    Uses `pkgutil.resolve_name`; importing the module runs its code. A
    callable is called only when it is marked with `samplepipe.factory`.
    """
    if not isinstance(spec, str):
        if kwargs:
            msg = f"{what}_kwargs was given, but {what} is not an import path."
            raise TypeError(msg)
        return spec
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        msg = (
            f"{what}={spec!r} is not an import path; use 'package.module:name', "
            "e.g. 'samplepipe.examples:demo_pipeline'."
        )
        raise ValueError(msg)
    try:
        obj = pkgutil.resolve_name(spec)
    except (ImportError, ValueError) as exc:
        msg = f"{what}={spec!r}: cannot import module {module_name!r} ({exc})."
        raise ValueError(msg) from exc
    except AttributeError as exc:
        msg = f"{what}={spec!r}: module {module_name!r} has no {attribute!r}."
        raise ValueError(msg) from exc
    if callable(obj) and not isinstance(obj, Pipeline):
        if not is_factory(obj):
            msg = (
                f"{what}={spec!r} names a callable that is not marked as a "
                "samplepipe factory; decorate it with @samplepipe.factory. Only "
                "marked functions may be called by import path: whoever can start "
                "a run could otherwise call any function."
            )
            raise ValueError(msg)
        obj = obj(**(kwargs or {}))
    elif kwargs:
        msg = f"{what}_kwargs was given, but {what}={spec!r} is not a factory."
        raise TypeError(msg)
    return obj


def _check_writable(path, what):
    """Raise before any work unless ``path`` is (or can be made) a writable folder.

    A URL is not checked here: an object store answers only when written to.
    """
    path = location_root(path)
    if is_url(path):
        return
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        msg = (
            f"{what} {path!r} cannot be a folder: {probe!r} is a file. Move the "
            f"file away or choose another {what}."
        )
        raise NotADirectoryError(errno.ENOTDIR, msg)
    if not os.access(probe, os.W_OK | os.X_OK):
        msg = (
            f"{what} {path!r} is not writable ({probe!r} denies writing); fix its "
            f"permissions or choose another {what}."
        )
        raise PermissionError(errno.EACCES, msg)


def _check_outputs(steps):
    """Check every folder and file the run will write, before any work."""
    for name, step in steps:
        if step.features_dir is not None:
            _check_writable(step.features_dir, f"features_dir of step {name!r}")
        if step.model_path is not None and not is_url(location_root(step.model_path)):
            model = os.path.abspath(location_root(step.model_path))
            if os.path.isdir(model):
                msg = (
                    f"the model of step {name!r} would be written to {model!r}, "
                    "which is a folder; remove it or choose another model_dir."
                )
                raise IsADirectoryError(errno.EISDIR, msg)
            _check_writable(os.path.dirname(model), f"model_dir of step {name!r}")


def prepare_steps(
    pipeline: Any,
    features_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    layout: str | None = None,
) -> list[tuple[str, CheckpointWrapper]]:
    """``[(name, CheckpointWrapper)]`` for each step of ``pipeline``.

    Plain estimators are wrapped in `SampleWrapper` and `CheckpointWrapper`
    (``features_dir/<name>/`` and ``model_dir/<name>.pkl``, with
    ``storage_options`` and ``layout``, None: the wrapper's default
    ``"files"``); wrapped steps keep their own folders, options and layout and
    get these where theirs are unset. ``DaskWrapper`` and ``ToDaskBag`` are
    dropped: the task runner distributes the work.
    """
    if not isinstance(pipeline, Pipeline):
        msg = (
            f"pipeline must be a scikit-learn Pipeline (or an import path to "
            f"one), got {type(pipeline).__name__}."
        )
        raise TypeError(msg)
    steps = []
    for name, est in pipeline.steps:
        check_step_name(name)
        if est is None or est == "passthrough" or isinstance(est, ToDaskBag):
            continue
        while isinstance(est, DaskWrapper):
            est = est.estimator
        wrapped = isinstance(est, CheckpointWrapper)
        if not wrapped:
            if not getattr(est, "_is_samplepipe_wrapper", False):
                est = SampleWrapper(est)
            est = CheckpointWrapper(est)
        else:
            est = copy.copy(est)
        if est.features_dir is None:
            est.features_dir = join_location(os.fspath(features_dir), name)
        if est.model_path is None and estimator_requires_fit(est.estimator):
            est.model_path = join_location(os.fspath(model_dir), f"{name}.pkl")
        if est.storage_options is None:
            est.storage_options = storage_options
        if layout is not None and not wrapped:
            est.layout = layout
        est._validate_params()
        steps.append((name, est))
    if not steps:
        msg = "pipeline has no step to run."
        raise ValueError(msg)
    return steps


# ---------------------------------------------------------------------------
# running steps
# ---------------------------------------------------------------------------
# Called as ``callback(done, total, description)`` after each batch, in the
# flow's process; the command line draws its progress bar with it.
progress_callbacks: list[Any] = []


class _Progress:
    """The run's progress artifact, updated at most every ``interval`` seconds.

    Each request to the API costs 0.02-0.2 s on a busy SQLite server: one per
    batch cost more than the batches of small samples themselves. The artifact
    is created at the first update, ``interval`` seconds into the run or at its
    end (a run that ends sooner, a cached one, costs one request, not two); the
    last batch always brings it to 100 %. ``progress_callbacks`` see every batch.

    ``total`` is the number of task runs when known; for a stream it grows as
    batches are read (`reading`), ``per_batch`` task runs each.
    """

    interval = 2.0

    def __init__(self, total, description, per_batch=1):
        self.total = total
        self.per_batch = per_batch
        self.read = 0
        self.done = 0
        self.description = description
        self.id: UUID | None = None
        self.updated = time.monotonic()

    def reading(self, source):
        """A batch was read from ``source``."""
        self.read += 1
        if source.length is None:  # a stream: the total so far
            self.total = max(self.total or 0, self.read * self.per_batch)

    def advance(self, n=1):
        self.done += n
        total = max(self.total or 0, self.done, 1)
        now = time.monotonic()
        if self.done >= total or now - self.updated >= self.interval:
            progress = 100.0 * self.done / total
            if self.id is None:
                self.id = cast(
                    "UUID",
                    create_progress_artifact(
                        progress=progress, description=self.description
                    ),
                )
            else:
                update_progress_artifact(self.id, progress=progress)
            self.updated = now
        for callback in progress_callbacks:
            callback(self.done, total, self.description)


def _n_batches(source, batch_size):
    """Task runs per step for ``source``, None for a stream."""
    if source.length is None:
        return None
    return -(-source.length // batch_size)


class _Batch:
    """A batch on its way through the steps: its samples and manifests so far."""

    __slots__ = ("keys", "samples", "start", "stop", "upstream")

    def __init__(self, start, samples):
        self.start = start
        self.stop = start + len(samples)
        self.samples = samples
        self.keys = [s.key for s in samples]
        self.upstream = []


def _run_steps(steps, source, options, progress, run):
    """Run every batch of ``source`` through ``steps``; return the lazy outputs.

    Batches go through the steps one after the other (depth first): a batch
    is read from the source when fewer than ``options.max_batches_in_flight``
    are on their way, and dropped once its last step is done, so the samples
    in this process are those of the batches in flight, whatever the size of
    the data set. A step's task gets the batch's samples and the manifests of
    the steps before it; its cache key chains from those manifests' digests
    (`samplepipe.tasks.batch_identity`), so a cached run reads manifests and
    visits no sample after the first step.

    Samples that failed (``on_error="raise"``) are added to ``run.failures``;
    a batch with failed samples goes no further.
    """
    n_steps = len(steps)
    step_ids = [step.step_identity() for _, step in steps]
    tasks = [
        transform_step.with_options(
            **options.task_options(), refresh_cache=bool(step.force)
        )
        for _, step in steps
    ]
    stats = [_StepStats() for _ in steps]
    outputs = PipelineOutputs(source)
    running = {}
    open_batches: list[_Batch] = []
    failed: list[list[Any]] = [[] for _ in steps]

    def submit(batch, k, again=False):
        name, step = steps[k]
        digest, ids = batch_identity(step, batch.samples, batch.upstream)
        # a batch whose cached manifest turned out stale runs again, uncached
        runner = tasks[k].with_options(refresh_cache=True) if again else tasks[k]
        # quote(): Prefect need not visit each sample and identity looking for
        # futures (they hold none); that visit cost more than the cache key.
        future = runner.submit(
            step=step,
            samples=unvisited(batch.samples),
            name=name,
            start=batch.start,
            stop=batch.stop,
            on_error=options.on_error,
            identities=unvisited((step_ids[k], digest, ids)),
            upstream=unvisited(list(batch.upstream)) if batch.upstream else None,
        )
        running[future] = (batch, k, again)

    reading = source.batches(options.batch_size)
    source_error = None
    # one batch at a time computes and writes in this process: the others in
    # flight do Prefect's bookkeeping meanwhile (memory: about two batches)
    context = FlowRunContext.get()
    run_id = context.flow_run.id if context and context.flow_run else None
    with one_batch_holds_data(run_id):
        while True:
            while reading is not None and len(open_batches) < (
                options.max_batches_in_flight
            ):
                try:
                    start, samples = next(reading)
                except StopIteration:
                    reading = None
                    break
                except Exception as exc:  # noqa: BLE001 - raised once in flight end
                    source_error, reading = exc, None
                    break
                batch = _Batch(start, samples)
                open_batches.append(batch)
                progress.reading(source)
                submit(batch, 0)
            if not running:
                break
            future = next(as_completed(list(running)))
            batch, k, again = running.pop(future)
            name, step = steps[k]
            future.wait()
            state = future.state
            if not state.is_completed():
                failed[k].append((batch.start, batch.stop, state))
                open_batches.remove(batch)
                progress.advance(n_steps - k)
                continue
            manifest = future.result()
            try:
                manifest.validate(batch.keys, step)
            except StaleManifestError:
                if again:
                    raise
                submit(batch, k, again=True)  # a damaged cache entry: redo
                continue
            stats[k].add(manifest, cached=state.name == "Cached")
            batch.upstream.append((step, manifest))
            progress.advance()
            if k + 1 < n_steps:
                submit(batch, k + 1)
            else:
                outputs._add(batch.start, batch.stop, batch.upstream)
                open_batches.remove(batch)
    for k, (name, step) in enumerate(steps):
        run.rows.append(stats[k].row(name, _task_of(step, options)))
    for k, (name, _) in enumerate(steps):
        _raise_failures(name, failed[k], run.failures, stats[k].batches)
    if source_error is not None:
        _raise_source_error(source, source_error, outputs)
    return outputs


def _task_of(step, options):
    return options.method if hasattr(step, "_predicts_for") else "transform"


class _StepStats:
    """One step's counts over a run: a row of the summary table.

    ``seconds`` is the time its task runs spent transforming (a cached batch
    costs none): the steps of a batch run one after the other, interleaved
    with other batches, so a step has no wall time of its own.
    """

    def __init__(self):
        self.samples = self.computed = self.loaded = self.failed = 0
        self.cached = self.batches = 0
        self.seconds = 0.0

    def add(self, manifest, cached):
        n, n_failed = len(manifest), manifest.failed
        self.samples += n
        self.failed += n_failed
        self.batches += 1
        if cached:
            self.cached += 1
            self.loaded += n - n_failed
        else:
            self.computed += manifest.computed
            self.loaded += manifest.loaded
            self.seconds += manifest.seconds

    def row(self, name, task):
        return {
            "step": name,
            "task": task,
            "samples": self.samples,
            "computed": self.computed,
            "loaded": self.loaded,
            "failed": self.failed,
            "cached batches": self.cached,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
        }


def _raise_source_error(source, exc, outputs):
    if isinstance(exc, TypeError | ValueError) and not isinstance(exc, SourceError):
        raise exc  # bad input the source's checks found: their message says it
    cause = exc.__cause__ if isinstance(exc, SourceError) else exc
    msg = (
        f"{exc}; the {len(outputs)} samples of the batches before it are "
        "checkpointed: run the flow again to resume."
    )
    raise PipelineRunError(msg, source.what) from cause


def _raise_failures(name, failed, failures, n_done):
    """Raise `PipelineRunError` for a step's failed batches, if any."""
    sample_failures, other = _split_failures(name, failed, failures)
    n_batches = n_done + len(failed)
    if other:
        start, stop, cause = other[0]
        msg = (
            f"step {name!r} failed on {len(other)} of {n_batches} batches "
            f"(first: [{start}:{stop}]: {cause!r}); the other batches are "
            "checkpointed: run the flow again to compute only the failed ones."
        )
        raise PipelineRunError(msg, name, sample_failures) from cause
    if sample_failures:
        keys = ", ".join(repr(k) for k, _ in sample_failures[:5])
        more = (
            f" and {len(sample_failures) - 5} more" if len(sample_failures) > 5 else ""
        )
        ranges = ", ".join(f"[{a}:{b}]" for a, b, _ in sorted(failed))
        msg = (
            f"step {name!r}: {len(sample_failures)} sample(s) failed in batches "
            f"{ranges}: {keys}{more} (first error: {sample_failures[0][1]}). Every "
            "other sample is checkpointed: run the flow again to compute only the "
            "failed ones, or pass on_error='skip' to keep them in line as None."
        )
        raise PipelineRunError(msg, name, sample_failures)


def _split_failures(name, failed, failures):
    """Failed batches: ``(sample failures in input order, other failures)``."""
    samples_failed, other = [], []
    for start, stop, state in sorted(failed, key=lambda f: f[0]):
        try:
            state.result()
        except SampleFailures as exc:
            for key, error in exc.failures:
                samples_failed.append((key, error))
                failures.append({"step": name, "key": key, "error": error})
        except Exception as exc:  # noqa: BLE001 - the task's own error, reported
            other.append((start, stop, exc))
    return samples_failed, other


def _fit_step(name, step, samples, options, rows, upstream):
    t0 = time.perf_counter()
    data = step.training_digest(samples)
    refresh = bool(step.force)
    while True:
        task = fit_step.with_options(**options.task_options(), refresh_cache=refresh)
        future = task.submit(
            step=step, samples=unvisited(samples), name=name, upstream=upstream
        )
        future.wait()
        state = future.state
        if not state.is_completed():
            try:
                state.result()
            except Exception as exc:
                msg = f"step {name!r} failed to fit: {exc!r}"
                raise PipelineRunError(msg, name) from exc
        manifest = future.result()
        # The fit may have run in another thread or on a Dask worker: load the
        # model saved by the task into this process's step.
        if step.load_model(data=data, upstream=upstream):
            break
        if state.name != "Cached" or refresh:
            msg = (
                f"step {name!r}: the model at {step.model_path!r} could not be loaded."
            )
            raise PipelineRunError(msg, name)
        refresh = True  # a cached fit whose model file is gone or replaced: redo
    fitted = state.name != "Cached" and manifest["fitted"]
    rows.append(
        {
            "step": name,
            "task": "fit",
            "samples": len(samples),
            "computed": len(samples) if fitted else 0,
            "loaded": 0 if fitted else len(samples),
            "failed": 0,
            "cached batches": int(state.name == "Cached"),
            "batches": 1,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )


def _summary(rows, title):
    create_table_artifact(
        table=rows,
        key="samplepipe-summary",
        description=f"# {title}\nPer step: samples, computed, loaded from "
        "checkpoints, failed (None outputs, kept in line), cached batches, seconds.",
    )
    logger = get_run_logger()
    for row in rows:
        logger.info(
            "%(step)s.%(task)s: %(samples)d samples, %(computed)d computed, "
            "%(loaded)d loaded, %(failed)d failed, "
            "%(cached batches)d/%(batches)d batches cached, "
            "%(seconds).2f s",
            row,
        )


def _failures_table(failures, title):
    create_table_artifact(
        table=failures,
        key="samplepipe-failures",
        description=f"# {title}: failed samples\nPer failed sample: step, key, error.",
    )


class _Run:
    """What one flow run accumulates: summary rows and failed samples."""

    def __init__(self, title):
        self.title = title
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []


def _summarized(title, work, *args):
    """Run ``work(*args, run)``; publish the summary (and failures) even on failure."""
    run = _Run(title)
    with api_for_tasks():  # Dask workers report to this flow's API
        try:
            return work(*args, run)
        finally:
            if run.rows:
                _summary(run.rows, title)
            if run.failures:
                _failures_table(run.failures, title)


# ---------------------------------------------------------------------------
# flows
# ---------------------------------------------------------------------------
def _prepare(pipeline, samples, options, pipeline_kwargs, samples_kwargs, fit):
    """Check every input before any work; return the wrapped steps and source.

    ``fit`` is ``"fit"`` (a fit alone: the last step's method does not matter),
    ``"run"`` (a fit before a transform) or ``False`` (a transform). A fit
    reads its samples whole (an estimator fits on all of them at once): its
    source is a list.
    """
    options.check()
    pipeline = load_object(pipeline, pipeline_kwargs, "pipeline")
    source = as_source(load_object(samples, samples_kwargs, "samples"))
    if fit:
        source = as_source(source.to_list())
    steps = prepare_steps(
        pipeline,
        options.features_dir,
        options.model_dir,
        options.storage_options,
        options.layout,
    )
    if fit and not len(source):
        msg = "samples is empty: there is nothing to fit on; give training samples."
        raise ValueError(msg)
    last_name, last = steps[-1]
    if fit != "fit" and not hasattr(last.estimator, options.method):
        msg = (
            f"method={options.method!r}: the last step {last_name!r} "
            f"({type(last.estimator).__name__}) has no {options.method!r}; it has "
            f"{available_methods(last.estimator)}."
        )
        raise ValueError(msg)
    if not fit and options.method != "transform":
        steps[-1] = (last_name, _method_step(last_name, last, options))
    _check_outputs(steps)
    return steps, source, _sized(options, source)


def _sized(options, source):
    """``options`` with a batch size: given, or about 64 MiB of input a batch.

    For a list or an indexed source the first sample is measured (loaded, if
    it is lazy: once); a stream's batches are those it yields.
    """
    if options.batch_size is not None or source.length is None:
        return options
    if source.length == 0:
        return replace(options, batch_size=DEFAULT_BATCH)
    first = source.batch(0, 1)[0]
    return replace(options, batch_size=estimate_batch_size(first))


def _method_step(name, step, options):
    """The last step, computing ``options.method`` instead of ``transform``.

    Its checkpoints go to ``features_dir/<step>.<method>/``; it shares the
    step's model file.
    """
    new = copy.copy(step)
    new.estimator = UseMethod(step.estimator, options.method)
    new.features_dir = join_location(
        os.fspath(options.features_dir), f"{name}.{options.method}"
    )
    new._predicts_for = step
    return new


def _fit(pipeline, samples, options, pipeline_kwargs, samples_kwargs, run, then="fit"):
    steps, source, options = _prepare(
        pipeline, samples, options, pipeline_kwargs, samples_kwargs, fit=then
    )
    per_step = _n_batches(source, options.batch_size)
    progress = _Progress(per_step * (len(steps) - 1), "fit: batches transformed")
    current = source.obj
    upstream: list[str] = []
    for i, (name, step) in enumerate(steps):
        if estimator_requires_fit(step.estimator):
            _fit_step(name, step, current, options, run.rows, combine(*upstream))
        upstream.append(step.step_identity())
        if i + 1 < len(steps):
            outputs = _run_steps(
                [(name, step)], as_source(current), options, progress, run
            )
            current = outputs.to_list()
    return Pipeline(steps)


def _load_models(steps):
    """Give each step its fitted state, all of one consistent fit.

    A step fitted in memory (the pipeline `fit_pipeline` returned) keeps its
    state. Otherwise its model file is loaded if it was fitted after exactly
    the steps before it as they are now; a model fitted after other upstream
    models (a fit that failed half way) is refused.
    """
    upstream: list[str] = []
    for name, wrapped in steps:
        step = getattr(wrapped, "_predicts_for", wrapped)
        if estimator_requires_fit(step.estimator):
            if step.__sklearn_is_fitted__():
                if getattr(step, "fitted_digest_", None) is None:
                    step.fitted_digest_ = fitted_digest(step.estimator)
            elif not step.load_model(upstream=combine(*upstream)):
                if step.load_model():
                    msg = (
                        f"step {name!r}: the model at {step.model_path!r} was fitted "
                        "after other versions of the steps before it (did a fit "
                        "fail half way?); run fit_pipeline again."
                    )
                else:
                    msg = (
                        f"step {name!r} is not fitted and has no model at "
                        f"{step.model_path!r}; run fit_pipeline first."
                    )
                raise PipelineRunError(msg, name)
            if wrapped is not step:
                wrapped.fitted_digest_ = fitted_digest(wrapped.estimator)
        upstream.append(step.step_identity())


def _transform(pipeline, samples, options, pipeline_kwargs, samples_kwargs, run):
    steps, source, options = _prepare(
        pipeline, samples, options, pipeline_kwargs, samples_kwargs, fit=False
    )
    _load_models(steps)
    per_step = _n_batches(source, options.batch_size)
    total = None if per_step is None else len(steps) * per_step
    progress = _Progress(total, "transform: batches", per_batch=len(steps))
    return _run_steps(steps, source, options, progress, run)


_FLOW_PARAMETERS = """
    Parameters
    ----------
    pipeline : Pipeline or str
        A scikit-learn `Pipeline` of plain or wrapped estimators, or an import
        path ``"package.module:factory"`` called with ``pipeline_kwargs``.
    samples : list of Sample, sample source or str
        Samples with unique keys: a list; an object with ``__len__`` and
        ``batch(start, stop)``; an iterable that yields lists of samples (a
        stream, read once); or an import path to one of these, called with
        ``samples_kwargs`` (see `samplepipe.sources`). Only the batches in
        flight are held in memory (a fit reads its samples whole).
    features_dir, model_dir : str
        Checkpoints go to ``features_dir/<step>/<key>.h5`` and
        ``model_dir/<step>.pkl``: local folders or fsspec URLs (``s3://...``).
    batch_size : int, default=None
        Samples per task run. None: about 64 MiB of input per batch (the
        first sample is measured, between 1 and 250,000 samples; 1,000 when
        it is not an array), or a stream's own batches. Each task run costs
        about 0.1 s of Prefect's bookkeeping: few, large batches at scale.
    retries, retry_delay_seconds : int, float
        Retries of a task run that failed with a transient I/O error.
    max_batches_in_flight : int, default=2
        Task runs of one step in flight at once. On the thread runner one of
        them at a time computes and writes; the others meanwhile do Prefect's
        state changes and cache lookups. The data in memory stays about two
        batches (a step's input and output) whatever the data set's size; on
        Dask workers, each task holds its own batch.
    method : str, default="transform"
        What the last step computes for each sample: ``"transform"``,
        ``"predict"``, ``"predict_proba"``, ``"predict_log_proba"``,
        ``"decision_function"`` or ``"score_samples"``. Predictions are
        checkpointed per sample under ``features_dir/<step>.<method>/``.
    on_error : {"raise", "skip"}, default="raise"
        When samples fail, every other sample is checkpointed and the failed
        ones are listed (task log, flow error, table artifact
        ``samplepipe-failures``). ``"raise"`` then fails the run (a new run
        computes only the failed samples); ``"skip"`` completes it with them
        in line as ``data=None``, counted in the summary.
    locks : str or LockManager, default=None
        Where the per-batch locks live. A lock manager object (any
        ``prefect.locking.protocol.LockManager``, e.g.
        ``samplepipe.locks.CrashSafeFileLocks("/a/folder")`` or
        ``samplepipe.locks.RedisLocks("redis://host:6379/0")``) is used as it
        is; it must pickle if the task runner sends tasks to other processes
        (Dask). A string is a URL (see `samplepipe.locks.lock_manager_from_url`):
        ``"redis://host:port/db"`` across hosts, ``"file:///a/folder"``. None
        reads ``SAMPLEPIPE_LOCKS`` (unset: file locks on this host). A
        deployment's parameters are JSON: give it a URL.
    storage_options : dict, default=None
        Passed to fsspec for URL folders (e.g. ``{"endpoint_url": ...}``).
        Flow parameters are stored by the Prefect server: give credentials
        through the environment or fsspec's configuration, not here.
    layout : {"files", "shards"}, default="files"
        How the steps the flow wraps itself checkpoint: one ``<key>.h5`` per
        sample, or shards of up to 64 MiB (one file, one request on an
        object store; see `CheckpointWrapper`). Steps that are already
        `CheckpointWrapper` keep their own layout.
"""


@sample_flow(name="fit-pipeline", validate_parameters=False)
def fit_pipeline(
    pipeline: Any,
    samples: Any,
    features_dir: str,
    model_dir: str,
    batch_size: int | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    pipeline_kwargs: dict | None = None,
    samples_kwargs: dict | None = None,
    max_batches_in_flight: int = 2,
    on_error: str = "raise",
    locks: str | LockManager | None = None,
    storage_options: dict | None = None,
    layout: str = "files",
) -> Pipeline:
    """Fit each step on the training samples transformed by the steps before it.

    Parameters are those of `transform_pipeline` (``samples`` are the training
    samples; ``method`` does not apply).

    Returns
    -------
    Pipeline
        The fitted pipeline of `CheckpointWrapper` steps.
    """
    options = RunOptions(
        features_dir=features_dir,
        model_dir=model_dir,
        batch_size=batch_size,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        max_batches_in_flight=max_batches_in_flight,
        method="transform",
        on_error=on_error,
        locks=locks,
        storage_options=storage_options,
        layout=layout,
    )
    return _summarized(
        "fit-pipeline",
        _fit,
        pipeline,
        samples,
        options,
        pipeline_kwargs,
        samples_kwargs,
    )


@sample_flow(name="transform-pipeline", validate_parameters=False)
def transform_pipeline(
    pipeline: Any,
    samples: Any,
    features_dir: str,
    model_dir: str,
    batch_size: int | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    pipeline_kwargs: dict | None = None,
    samples_kwargs: dict | None = None,
    max_batches_in_flight: int = 2,
    method: str = "transform",
    on_error: str = "raise",
    locks: str | LockManager | None = None,
    storage_options: dict | None = None,
    layout: str = "files",
) -> PipelineOutputs:
    """Apply the fitted steps to each batch, one batch after the other.
    {parameters}
    Returns
    -------
    PipelineOutputs
        The output samples in input order, keys and metadata kept, data
        loading lazily from the checkpoints (``data=None`` for failed samples
        with ``on_error="skip"``): a sequence built on demand from the
        batches' manifests (about 100 bytes a sample), see
        `samplepipe.outputs.PipelineOutputs`; ``.to_list()`` builds them all.
    """
    options = RunOptions(
        features_dir=features_dir,
        model_dir=model_dir,
        batch_size=batch_size,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        max_batches_in_flight=max_batches_in_flight,
        method=method,
        on_error=on_error,
        locks=locks,
        storage_options=storage_options,
        layout=layout,
    )
    outputs = _summarized(
        "transform-pipeline",
        _transform,
        pipeline,
        samples,
        options,
        pipeline_kwargs,
        samples_kwargs,
    )
    return returned(outputs)


@sample_flow(name="run-pipeline", validate_parameters=False)
def run_pipeline(
    pipeline: Any,
    train_samples: Any,
    samples: Any,
    features_dir: str,
    model_dir: str,
    batch_size: int | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    pipeline_kwargs: dict | None = None,
    train_samples_kwargs: dict | None = None,
    samples_kwargs: dict | None = None,
    max_batches_in_flight: int = 2,
    method: str = "transform",
    on_error: str = "raise",
    locks: str | LockManager | None = None,
    storage_options: dict | None = None,
    layout: str = "files",
) -> list[dict]:
    """Fit on ``train_samples``, then transform ``samples``; what deployments run.

    Parameters are those of `transform_pipeline`. Returns the per-step summary
    rows (JSON), the same as the table artifact.
    """
    options = RunOptions(
        features_dir=features_dir,
        model_dir=model_dir,
        batch_size=batch_size,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        max_batches_in_flight=max_batches_in_flight,
        method=method,
        on_error=on_error,
        locks=locks,
        storage_options=storage_options,
        layout=layout,
    )

    def fit_then_transform(run):
        fitted = _fit(
            pipeline,
            train_samples,
            options,
            pipeline_kwargs,
            train_samples_kwargs,
            run,
            then="run",
        )
        _transform(fitted, samples, options, None, samples_kwargs, run)
        return run.rows

    return _summarized("run-pipeline", fit_then_transform)


transform_pipeline.__doc__ = (transform_pipeline.__doc__ or "").replace(
    "{parameters}", _FLOW_PARAMETERS
)
transform_pipeline.fn.__doc__ = transform_pipeline.__doc__

__all__ = [
    "PipelineRunError",
    "RunOptions",
    "fit_pipeline",
    "load_object",
    "prepare_steps",
    "run_pipeline",
    "transform_pipeline",
]
