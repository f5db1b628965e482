"""The depth-first batch scheduler of the flows: batches through steps, as tasks.

`run_steps` reads a source batch by batch and takes each batch through every
step, a few batches in flight at a time; `fit_one_step` runs one step's fit
task. Both add a summary row per step to the flow run's `RunRecord` (see
`samplepipe._summary`); failed samples and batches become a
`PipelineRunError` once every other batch is done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from ._prefect import tasks_share_this_process, unvisited
from .errors import PipelineRunError, SourceError
from .outputs import PipelineOutputs
from .sources import SourceBatch
from .storage import combine
from .tasks import (
    SampleFailures,
    StaleManifestError,
    batch_identity,
    fit_step,
    one_batch_holds_data,
    transform_step,
)

if TYPE_CHECKING:
    from ._options import RunOptions
    from ._summary import RunRecord
    from .sources import SampleSource
    from .wrappers import CheckpointWrapper

__all__ = [
    "PlannedStep",
    "Progress",
    "fit_one_step",
    "n_batches",
    "progress_callbacks",
    "run_steps",
]


@dataclass(frozen=True)
class PlannedStep:
    """One step of a flow run: the wrapper that runs, and what it computes.

    Attributes
    ----------
    name : str
        The step's name in the pipeline.
    wrapper : CheckpointWrapper
        What the step's tasks run.
    method : str, default="transform"
        What the step computes, the ``task`` column of the summary table.
    fitted : CheckpointWrapper or None, default=None
        For a last step that computes ``method`` instead of ``transform``
        (``wrapper`` is then a copy around `UseMethod` that checkpoints to
        ``features_dir/<name>.<method>/``): the pipeline's own step, whose
        model it uses. None: ``wrapper`` is the pipeline's step.
    """

    name: str
    wrapper: CheckpointWrapper
    method: str = "transform"
    fitted: CheckpointWrapper | None = None

    @property
    def model_step(self) -> CheckpointWrapper:
        """The step whose model this one uses: `fitted`, or the wrapper itself."""
        return self.wrapper if self.fitted is None else self.fitted


# Called as ``callback(done, total, description)`` after each batch, in the
# flow's process; the command line draws its progress bar with it.
progress_callbacks: list[Any] = []


class Progress:
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

    def __init__(self, total: int | None, description: str, per_batch: int = 1) -> None:
        self.total = total
        self.per_batch = per_batch
        self.read = 0
        self.done = 0
        self.description = description
        self.id: UUID | None = None
        self.updated = time.monotonic()

    def reading(self, source: SampleSource) -> None:
        """A batch was read from ``source``."""
        self.read += 1
        if source.length is None:  # a stream: the total so far
            self.total = max(self.total or 0, self.read * self.per_batch)

    def advance(self, n: int = 1) -> None:
        """``n`` task runs are done."""
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


def n_batches(source: SampleSource, batch_size: int | None) -> int | None:
    """Task runs per step for ``source``, None for a stream (or no batch size)."""
    if source.length is None or batch_size is None:
        return None
    return -(-source.length // batch_size)


class _Batch:
    """A batch on its way through the steps: its samples and manifests so far.

    ``samples`` is a list, or a `SourceBatch` (read by the first task that
    needs it) whose ``fingerprint`` then stands for its samples' identities.
    """

    __slots__ = ("fingerprint", "keys", "samples", "start", "stop", "upstream")

    def __init__(self, start, samples):
        self.start = start
        self.stop = start + len(samples)
        self.samples = samples
        self.upstream = []
        self.fingerprint: str | None = None
        if isinstance(samples, SourceBatch):
            self.keys = None
            self.fingerprint = combine(
                "source", str(start), str(self.stop), samples.fingerprint
            )
        else:
            self.keys = [s.key for s in samples]

    def checked_keys(self, manifest):
        """The keys a step's manifest must name: the batch's, once known."""
        if self.keys is None:
            self.keys = self.samples.keys
        if self.keys is not None:
            return self.keys
        keys = manifest.key_list()  # a cached batch, never read
        if len(keys) != self.stop - self.start:
            msg = f"manifest names {len(keys)} samples for [{self.start}:{self.stop}]"
            raise StaleManifestError(msg)
        self.keys = keys
        return keys


def run_steps(
    steps: list[PlannedStep],
    source: SampleSource,
    options: RunOptions,
    progress: Progress,
    run: RunRecord,
) -> PipelineOutputs:
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
    step_ids = [planned.wrapper.step_identity() for planned in steps]
    tasks = [
        transform_step.with_options(
            **options.task_options(), refresh_cache=bool(planned.wrapper.force)
        )
        for planned in steps
    ]
    stats = [_StepStats() for _ in steps]
    outputs = PipelineOutputs(source)
    running = {}
    open_batches: list[_Batch] = []
    failed: list[list[Any]] = [[] for _ in steps]

    def submit(batch, k, again=False):
        name, step = steps[k].name, steps[k].wrapper
        digest, ids = batch_identity(
            step, batch.samples, batch.upstream, batch.fingerprint
        )
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

    # a fingerprinted source's batches are read by their first task that runs
    # (one whose cache key hits is never read): tasks must share this process
    reading: Iterator[tuple[int, Any]] | None
    if source.fingerprinted and tasks_share_this_process():
        reading = source.unread_batches(options.batch_size)
    else:
        reading = source.batches(options.batch_size)
    source_error = None
    # one batch at a time computes and writes in this process: the others in
    # flight do Prefect's bookkeeping meanwhile (memory: about two batches)
    context = FlowRunContext.get()
    run_id = context.flow_run.id if context and context.flow_run else None
    with one_batch_holds_data(run_id), _closing(source):
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
            step = steps[k].wrapper
            future.wait()
            state = future.state
            if not state.is_completed():
                read_error = _read_error(batch)
                if read_error is None:
                    failed[k].append((batch.start, batch.stop, state))
                elif source_error is None:  # as if the flow had read it
                    source_error, reading = read_error, None
                open_batches.remove(batch)
                progress.advance(n_steps - k)
                continue
            manifest = future.result()
            try:
                manifest.validate(batch.checked_keys(manifest), step)
            except StaleManifestError:
                if again:
                    raise
                submit(batch, k, again=True)  # a damaged cache entry: redo
                continue
            if isinstance(batch.samples, SourceBatch):
                try:  # a cached batch, never read: its keys from its manifest
                    batch.samples.settle(batch.keys)
                except ValueError as exc:
                    if source_error is None:
                        source_error, reading = exc, None
                    open_batches.remove(batch)
                    progress.advance(n_steps - k)
                    continue
            stats[k].add(manifest, cached=state.name == "Cached")
            batch.upstream.append((step, manifest))
            progress.advance()
            if k + 1 < n_steps:
                submit(batch, k + 1)
            else:
                outputs.add_batch(batch.start, batch.stop, batch.upstream)
                open_batches.remove(batch)
    for k, planned in enumerate(steps):
        run.rows.append(stats[k].row(planned.name, planned.method))
    for k, planned in enumerate(steps):
        _raise_failures(planned.name, failed[k], run.failures, stats[k].batches)
    if source_error is not None:
        _raise_source_error(source, source_error, outputs)
    return outputs


def _read_error(batch):
    """What reading a `SourceBatch` raised in its task, if it did (else None)."""
    samples = batch.samples
    if isinstance(samples, SourceBatch):
        if not samples.settled:  # failed before it was read: later ones go on
            samples.settle(None)
        return samples.error
    return None


@contextlib.contextmanager
def _closing(source):
    """Batches of ``source`` still waiting to be read fail once the run ends."""
    try:
        yield
    finally:
        source.close()


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


def fit_one_step(
    name: str,
    step: CheckpointWrapper,
    samples: list[Any],
    options: RunOptions,
    rows: list[dict[str, Any]],
    upstream: str,
) -> None:
    """Fit ``step`` through the fit task and load its model; add its summary row."""
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
