"""Prefect flows that fit and transform whole pipelines, batch by batch.

Each step of the pipeline is wrapped for samples and checkpoints; each batch of
samples becomes one cached task run per step (see `samplepipe.tasks`). Use
another task runner with ``fit_pipeline.with_options(task_runner=...)``, e.g.
``prefect_dask.DaskTaskRunner(address=...)``.
"""

from __future__ import annotations

import copy
import importlib
import os
import time
from typing import Any, cast
from uuid import UUID

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from sklearn.pipeline import Pipeline

from .storage import check_step_name, combine, fitted_digest, sample_keys
from .tasks import (
    StaleManifestError,
    fit_step,
    samples_from_manifest,
    transform_step,
)
from .wrappers import CheckpointWrapper, DaskWrapper, SampleWrapper, ToDaskBag
from .wrappers._base import estimator_requires_fit
from .wrappers._sample import Sample, SampleSet


class PipelineRunError(RuntimeError):
    """A step of a flow failed; ``step`` names it."""

    def __init__(self, msg, step):
        super().__init__(msg)
        self.step = step


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def load_object(spec, kwargs=None, what="object"):
    """Resolve ``"package.module:name"`` (called with ``kwargs`` if callable)."""
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
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"{what}={spec!r}: cannot import module {module_name!r} ({exc})."
        raise ValueError(msg) from exc
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        msg = f"{what}={spec!r}: module {module_name!r} has no {attribute!r}."
        raise ValueError(msg) from exc
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj(**(kwargs or {}))
    return obj


def _check_samples(samples, what="samples"):
    if not isinstance(samples, list | tuple):
        msg = (
            f"{what} must be a list of samples, got {type(samples).__name__}; "
            "build them with samplepipe.Sample(data, key=...)."
        )
        raise TypeError(msg)
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            kind = "a SampleSet" if isinstance(s, SampleSet) else type(s).__name__
            msg = (
                f"{what}[{i}] is {kind}; the flows take a flat list of Sample objects."
            )
            raise TypeError(msg)
    sample_keys(samples, owner=what)
    return list(samples)


def prepare_steps(pipeline, features_dir, model_dir):
    """``[(name, CheckpointWrapper)]`` for each step of ``pipeline``.

    Plain estimators are wrapped in `SampleWrapper` and `CheckpointWrapper`
    (``features_dir/<name>/`` and ``model_dir/<name>.pkl``); wrapped steps keep
    their own folders and get these where theirs are unset. ``DaskWrapper``
    and ``ToDaskBag`` are dropped: the task runner distributes the work.
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
        if not isinstance(est, CheckpointWrapper):
            if not getattr(est, "_is_samplepipe_wrapper", False):
                est = SampleWrapper(est)
            est = CheckpointWrapper(est)
        else:
            est = copy.copy(est)
        if est.features_dir is None:
            est.features_dir = os.path.join(os.fspath(features_dir), name)
        if est.model_path is None and estimator_requires_fit(est.estimator):
            est.model_path = os.path.join(os.fspath(model_dir), f"{name}.pkl")
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
    def __init__(self, total, description):
        self.total = max(total, 1)
        self.done = 0
        self.description = description
        self.id = cast(
            "UUID", create_progress_artifact(progress=0.0, description=description)
        )

    def advance(self):
        self.done += 1
        update_progress_artifact(self.id, progress=100.0 * self.done / self.total)
        for callback in progress_callbacks:
            callback(self.done, self.total, self.description)


def _batches(n, batch_size):
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _transform_step(
    name, step, samples, batch_size, options, progress, rows, in_flight=2
):
    """Run one step over all batches; return its output samples in order.

    At most ``in_flight`` batches run at once, so memory stays bounded by a
    few batches whatever the size of the data set.
    """
    t0 = time.perf_counter()
    task = transform_step.with_options(**options, refresh_cache=bool(step.force))
    refresh = transform_step.with_options(**options, refresh_cache=True)
    pending = list(_batches(len(samples), batch_size))
    n_batches = len(pending)
    running = {}
    outputs = [None] * len(samples)
    computed = loaded = cached = n_failed = 0
    failed = []

    def submit(batch=None, again=False):
        start, stop = batch or pending.pop(0)
        future = (refresh if again else task).submit(
            step=step, samples=samples[start:stop], name=name, start=start, stop=stop
        )
        running[future] = (start, stop, again)

    while pending and len(running) < in_flight:
        submit()
    while running:
        future = next(as_completed(list(running)))
        start, stop, again = running.pop(future)
        future.wait()
        state = future.state
        if not state.is_completed():
            failed.append((start, stop, state))
        else:
            manifest = future.result()
            try:
                batch = samples_from_manifest(manifest, samples[start:stop], step)
            except StaleManifestError:
                if again:
                    raise
                submit((start, stop), again=True)  # a damaged cache entry: redo
                continue
            outputs[start:stop] = batch
            if state.name == "Cached":
                cached += 1
                loaded += stop - start - sum(f is None for f in manifest["files"])
            else:
                computed += manifest["computed"]
                loaded += manifest["loaded"]
            n_failed += sum(f is None for f in manifest["files"])
        if pending:
            submit()
        progress.advance()
    rows.append(
        {
            "step": name,
            "task": "transform",
            "samples": len(samples),
            "computed": computed,
            "loaded": loaded,
            "failed": n_failed,
            "cached batches": cached,
            "batches": n_batches,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
    if failed:
        start, stop, state = failed[0]
        cause: BaseException | None = None
        try:
            state.result()
        except Exception as exc:  # the task's own error
            cause = exc
        msg = (
            f"step {name!r} failed on {len(failed)} of {n_batches} batches "
            f"(first: [{start}:{stop}]: {cause!r}); the other batches are "
            "checkpointed: run the flow again to compute only the failed ones."
        )
        raise PipelineRunError(msg, name) from cause
    return outputs


def _fit_step(name, step, samples, options, rows, upstream):
    t0 = time.perf_counter()
    future = fit_step.with_options(**options, refresh_cache=bool(step.force)).submit(
        step=step, samples=samples, name=name, upstream=upstream
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
    if not step.load_model(data=step.training_digest(samples), upstream=upstream):
        msg = f"step {name!r}: the model at {step.model_path!r} could not be loaded."
        raise PipelineRunError(msg, name)
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


def _task_options(retries, retry_delay_seconds):
    return {"retries": retries, "retry_delay_seconds": retry_delay_seconds}


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


def _summarized(title, work, *args):
    """Run ``work(*args, rows)``; publish the summary table even when it fails."""
    rows: list[dict[str, Any]] = []
    try:
        return work(*args, rows)
    finally:
        if rows:
            _summary(rows, title)


def _check_batch_size(batch_size, in_flight=1):
    if not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be an int >= 1, got {batch_size!r}."
        raise ValueError(msg)
    if not isinstance(in_flight, int) or in_flight < 1:
        msg = f"max_batches_in_flight must be an int >= 1, got {in_flight!r}."
        raise ValueError(msg)


# ---------------------------------------------------------------------------
# flows
# ---------------------------------------------------------------------------
def summarize_parameter(value):
    """What the Prefect API stores of a flow parameter: JSON, and small.

    Prefect sends flow parameters to its API (which refuses more than 512 KB).
    Lists of samples become ``"<N samples: first-key ... last-key>"`` and
    estimators their repr; JSON values (import paths, dicts) pass unchanged.
    """
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(s, Sample | SampleSet) for s in value[:1])
    ):
        first, last = (getattr(s, "key", "?") for s in (value[0], value[-1]))
        return f"<{len(value)} samples: {first} ... {last}>"
    if hasattr(value, "get_params"):
        return repr(value)[:2000]
    return value


class SampleFlow(Flow):
    """A Prefect flow that stores only summaries of in-memory parameters."""

    def serialize_parameters(self, parameters):
        return super().serialize_parameters(
            {k: summarize_parameter(v) for k, v in parameters.items()}
        )

    def with_options(self, **kwargs):
        new = super().with_options(**kwargs)
        new.__class__ = SampleFlow
        return new


def sample_flow(**kwargs):
    """``@flow`` for samplepipe's flows (see `SampleFlow`)."""

    def decorate(fn):
        new = flow(**kwargs)(fn)
        new.__class__ = SampleFlow
        return new

    return decorate


def _prepare(
    pipeline,
    samples,
    features_dir,
    model_dir,
    batch_size,
    pipeline_kwargs,
    samples_kwargs,
    in_flight,
):
    """Check every input before any work; return the wrapped steps and samples."""
    pipeline = load_object(pipeline, pipeline_kwargs, "pipeline")
    samples = _check_samples(load_object(samples, samples_kwargs, "samples"))
    _check_batch_size(batch_size, in_flight)
    return prepare_steps(pipeline, features_dir, model_dir), samples


def _fit(
    pipeline,
    samples,
    features_dir,
    model_dir,
    batch_size,
    retries,
    retry_delay_seconds,
    pipeline_kwargs,
    samples_kwargs,
    in_flight,
    rows,
):
    steps, samples = _prepare(
        pipeline,
        samples,
        features_dir,
        model_dir,
        batch_size,
        pipeline_kwargs,
        samples_kwargs,
        in_flight,
    )
    options = _task_options(retries, retry_delay_seconds)
    n_batches = sum(len(_batches(len(samples), batch_size)) for _ in steps[:-1])
    progress = _Progress(n_batches, "fit: batches transformed")
    current = samples
    upstream: list[str] = []
    for i, (name, step) in enumerate(steps):
        if estimator_requires_fit(step.estimator):
            _fit_step(name, step, current, options, rows, combine(*upstream))
        upstream.append(step.step_identity())
        if i + 1 < len(steps):
            current = _transform_step(
                name,
                step,
                current,
                batch_size,
                options,
                progress,
                rows,
                in_flight,
            )
    return Pipeline(steps)


def _load_models(steps):
    """Give each step its fitted state, all of one consistent fit.

    A step fitted in memory (the pipeline `fit_pipeline` returned) keeps its
    state. Otherwise its model file is loaded if it was fitted after exactly
    the steps before it as they are now; a model fitted after other upstream
    models (a fit that failed half way) is refused.
    """
    upstream: list[str] = []
    for name, step in steps:
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
        upstream.append(step.step_identity())


def _transform(
    pipeline,
    samples,
    features_dir,
    model_dir,
    batch_size,
    retries,
    retry_delay_seconds,
    pipeline_kwargs,
    samples_kwargs,
    in_flight,
    rows,
):
    steps, samples = _prepare(
        pipeline,
        samples,
        features_dir,
        model_dir,
        batch_size,
        pipeline_kwargs,
        samples_kwargs,
        in_flight,
    )
    _load_models(steps)
    options = _task_options(retries, retry_delay_seconds)
    progress = _Progress(
        len(steps) * len(_batches(len(samples), batch_size)), "transform: batches"
    )
    current = samples
    for name, step in steps:
        current = _transform_step(
            name,
            step,
            current,
            batch_size,
            options,
            progress,
            rows,
            in_flight,
        )
    return current


@sample_flow(name="fit-pipeline", validate_parameters=False)
def fit_pipeline(
    pipeline: Any,
    samples: Any,
    features_dir: str,
    model_dir: str,
    batch_size: int = 1000,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    pipeline_kwargs: dict | None = None,
    samples_kwargs: dict | None = None,
    max_batches_in_flight: int = 2,
) -> Pipeline:
    """Fit each step on the training samples transformed by the steps before it.

    Parameters
    ----------
    pipeline : Pipeline or str
        A scikit-learn `Pipeline` of plain or wrapped estimators, or an import
        path ``"package.module:factory"`` called with ``pipeline_kwargs``.
    samples : list of Sample or str
        Training samples with unique keys, or an import path called with
        ``samples_kwargs``.
    features_dir, model_dir : str
        Checkpoints go to ``features_dir/<step>/<key>.h5`` and
        ``model_dir/<step>.pkl``.
    batch_size : int, default=1000
        Samples per task run.
    retries, retry_delay_seconds : int, float
        Retries of a task run that failed with an I/O error (`OSError`).
    max_batches_in_flight : int, default=2
        Batches of one step that run at once; memory stays bounded by about
        this many batches (and their outputs), whatever the data set's size.

    Returns
    -------
    Pipeline
        The fitted pipeline of `CheckpointWrapper` steps.
    """
    return _summarized(
        "fit-pipeline",
        _fit,
        pipeline,
        samples,
        features_dir,
        model_dir,
        batch_size,
        retries,
        retry_delay_seconds,
        pipeline_kwargs,
        samples_kwargs,
        max_batches_in_flight,
    )


@sample_flow(name="transform-pipeline", validate_parameters=False)
def transform_pipeline(
    pipeline: Any,
    samples: Any,
    features_dir: str,
    model_dir: str,
    batch_size: int = 1000,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    pipeline_kwargs: dict | None = None,
    samples_kwargs: dict | None = None,
    max_batches_in_flight: int = 2,
) -> list:
    """Apply the fitted steps batch by batch, step by step.

    Parameters are those of `fit_pipeline`. Returns the output samples in input
    order, keys and metadata kept, data loading lazily from the checkpoints.
    """
    return _summarized(
        "transform-pipeline",
        _transform,
        pipeline,
        samples,
        features_dir,
        model_dir,
        batch_size,
        retries,
        retry_delay_seconds,
        pipeline_kwargs,
        samples_kwargs,
        max_batches_in_flight,
    )


@sample_flow(name="run-pipeline", validate_parameters=False)
def run_pipeline(
    pipeline: Any,
    train_samples: Any,
    samples: Any,
    features_dir: str,
    model_dir: str,
    batch_size: int = 1000,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    pipeline_kwargs: dict | None = None,
    train_samples_kwargs: dict | None = None,
    samples_kwargs: dict | None = None,
    max_batches_in_flight: int = 2,
) -> list[dict]:
    """Fit on ``train_samples``, then transform ``samples``; what deployments run.

    Returns the per-step summary rows (JSON), the same as the table artifact.
    """

    def fit_then_transform(rows):
        fitted = _fit(
            pipeline,
            train_samples,
            features_dir,
            model_dir,
            batch_size,
            retries,
            retry_delay_seconds,
            pipeline_kwargs,
            train_samples_kwargs,
            max_batches_in_flight,
            rows,
        )
        _transform(
            fitted,
            samples,
            features_dir,
            model_dir,
            batch_size,
            retries,
            retry_delay_seconds,
            None,
            samples_kwargs,
            max_batches_in_flight,
            rows,
        )
        return rows

    return _summarized("run-pipeline", fit_then_transform)


__all__ = [
    "PipelineRunError",
    "fit_pipeline",
    "load_object",
    "prepare_steps",
    "run_pipeline",
    "transform_pipeline",
]
