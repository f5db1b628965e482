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
from dataclasses import replace
from typing import Any

from prefect.locking.protocol import LockManager
from sklearn.pipeline import Pipeline

from ._factory import is_factory
from ._manifest import layout_kind
from ._options import LAYOUTS as LAYOUTS
from ._options import ON_ERROR as ON_ERROR
from ._options import RunOptions as RunOptions
from ._prefect import SampleFlow as SampleFlow
from ._prefect import returned, sample_flow
from ._prefect import summarize_parameter as summarize_parameter
from ._schedule import PlannedStep, Progress, fit_one_step, n_batches, run_steps
from ._schedule import progress_callbacks as progress_callbacks
from ._summary import RunRecord, summarized
from .errors import PipelineRunError as PipelineRunError
from .outputs import PipelineOutputs
from .sources import DEFAULT_BATCH, SampleSource, as_source, estimate_batch_size
from .storage import (
    check_step_name,
    combine,
    fitted_digest,
    is_url,
    join_location,
    location_root,
)
from .wrappers import (
    CheckpointWrapper,
    DaskWrapper,
    SampleWrapper,
    ToDaskBag,
    UseMethod,
    available_methods,
    estimator_requires_fit,
)


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
        est.check_parameters()
        try:
            layout_kind(est)  # a layout the manifests can record
        except ValueError as exc:
            raise ValueError(f"step {name!r}: {exc}") from None
        steps.append((name, est))
    if not steps:
        msg = "pipeline has no step to run."
        raise ValueError(msg)
    return steps


# ---------------------------------------------------------------------------
# flows
# ---------------------------------------------------------------------------
def _prepare(
    pipeline: Any,
    samples: Any,
    options: RunOptions,
    pipeline_kwargs: dict | None,
    samples_kwargs: dict | None,
    fit: str | bool,
) -> tuple[list[PlannedStep], SampleSource, RunOptions]:
    """Check every input before any work; return the planned steps and source.

    ``fit`` is ``"fit"`` (a fit alone: the last step's method does not matter),
    ``"run"`` (a fit before a transform) or ``False`` (a transform). A fit
    reads its samples whole (an estimator fits on all of them at once): its
    source is a list. A transform whose ``options.method`` is not
    ``"transform"`` computes it with its last step (`_method_step`).
    """
    options.check()
    pipeline = load_object(pipeline, pipeline_kwargs, "pipeline")
    source = as_source(load_object(samples, samples_kwargs, "samples"))
    if fit:
        source = as_source(source.to_list())
    steps = [
        PlannedStep(name, step)
        for name, step in prepare_steps(
            pipeline,
            options.features_dir,
            options.model_dir,
            options.storage_options,
            options.layout,
        )
    ]
    if fit and not len(source):
        msg = "samples is empty: there is nothing to fit on; give training samples."
        raise ValueError(msg)
    last = steps[-1]
    if fit != "fit" and not hasattr(last.wrapper.estimator, options.method):
        msg = (
            f"method={options.method!r}: the last step {last.name!r} "
            f"({type(last.wrapper.estimator).__name__}) has no {options.method!r}; "
            f"it has {available_methods(last.wrapper.estimator)}."
        )
        raise ValueError(msg)
    if not fit and options.method != "transform":
        steps[-1] = _method_step(last, options)
    _check_outputs([(planned.name, planned.wrapper) for planned in steps])
    return steps, source, _sized(options, source)


def _sized(options: RunOptions, source: SampleSource) -> RunOptions:
    """``options`` with a batch size: given, or about 32 MiB of input a batch.

    For a list or an indexed source the first sample is measured (loaded, if
    it is lazy: once); a stream's batches are those it yields.
    """
    if options.batch_size is not None or source.length is None:
        return options
    if source.length == 0:
        return replace(options, batch_size=DEFAULT_BATCH)
    first = source.batch(0, 1)[0]
    return replace(options, batch_size=estimate_batch_size(first))


def _method_step(planned: PlannedStep, options: RunOptions) -> PlannedStep:
    """The last step, computing ``options.method`` instead of ``transform``.

    Its checkpoints go to ``features_dir/<step>.<method>/``; it shares the
    step's model file (``fitted`` is the pipeline's own step).
    """
    step = planned.wrapper
    new = copy.copy(step)
    new.estimator = UseMethod(step.estimator, options.method)
    new.features_dir = join_location(
        os.fspath(options.features_dir), f"{planned.name}.{options.method}"
    )
    return PlannedStep(planned.name, new, method=options.method, fitted=step)


def _fit(
    pipeline: Any,
    samples: Any,
    options: RunOptions,
    pipeline_kwargs: dict | None,
    samples_kwargs: dict | None,
    run: RunRecord,
    then: str = "fit",
) -> Pipeline:
    steps, source, options = _prepare(
        pipeline, samples, options, pipeline_kwargs, samples_kwargs, fit=then
    )
    per_step = n_batches(source, options.batch_size)
    assert per_step is not None  # a fit's source is a list
    progress = Progress(per_step * (len(steps) - 1), "fit: batches transformed")
    current = source.obj
    upstream: list[str] = []
    for i, planned in enumerate(steps):
        step = planned.wrapper
        if estimator_requires_fit(step.estimator):
            fit_one_step(
                planned.name, step, current, options, run.rows, combine(*upstream)
            )
        upstream.append(step.step_identity())
        if i + 1 < len(steps):
            outputs = run_steps([planned], as_source(current), options, progress, run)
            current = outputs.to_list()
    return Pipeline([(planned.name, planned.wrapper) for planned in steps])


def _load_models(steps: list[PlannedStep]) -> None:
    """Give each step its fitted state, all of one consistent fit.

    A step fitted in memory (the pipeline `fit_pipeline` returned) keeps its
    state. Otherwise its model file is loaded if it was fitted after exactly
    the steps before it as they are now; a model fitted after other upstream
    models (a fit that failed half way) is refused. A step that computes
    another method than ``transform`` gets the state of the step it uses.
    """
    upstream: list[str] = []
    for planned in steps:
        name, step = planned.name, planned.model_step
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
            if planned.fitted is not None:  # the copy around UseMethod
                wrapper = planned.wrapper
                wrapper.fitted_digest_ = fitted_digest(wrapper.estimator)
        upstream.append(step.step_identity())


def _transform(
    pipeline: Any,
    samples: Any,
    options: RunOptions,
    pipeline_kwargs: dict | None,
    samples_kwargs: dict | None,
    run: RunRecord,
) -> PipelineOutputs:
    steps, source, options = _prepare(
        pipeline, samples, options, pipeline_kwargs, samples_kwargs, fit=False
    )
    _load_models(steps)
    per_step = n_batches(source, options.batch_size)
    total = None if per_step is None else len(steps) * per_step
    progress = Progress(total, "transform: batches", per_batch=len(steps))
    return run_steps(steps, source, options, progress, run)


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
        Samples per task run. None: about 32 MiB of input per batch (the
        first sample is measured, between 1 and 250,000 samples; 1,000 when
        it is not an array), or a stream's own batches. Each task run costs
        about 0.1 s of Prefect's bookkeeping: few, large batches at scale.
    retries, retry_delay_seconds : int, float
        Retries of a task run that failed with a transient I/O error.
    max_batches_in_flight : int, default=2
        Task runs of one step in flight at once. On the thread runner one of
        them at a time computes and writes; the others meanwhile do Prefect's
        state changes and cache lookups. The data in memory stays about two
        batches (a step's input and output) whatever the data set's size (with
        ``layout="shards"`` the index of each step's folder grows with it); on
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
    return summarized(
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
    outputs = summarized(
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

    def fit_then_transform(run: RunRecord) -> list[dict[str, Any]]:
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

    return summarized("run-pipeline", fit_then_transform)


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
