"""The ``samplepipe`` command line: run, serve, status, clean, why, verify.

Built on cyclopts and rich, which Prefect itself depends on. ``run`` and ``serve``
are here; the commands that judge checkpoint folders without Prefect are in
`samplepipe._cli_folders` (status, clean) and `samplepipe._cli_explain` (why,
verify), their shared parts in `samplepipe._cli_common`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import signal
import sys
import time
from typing import Any

from cyclopts import App
from rich.markup import escape
from rich.table import Table

from ._cli_common import DEMO_DIR as DEMO_DIR
from ._cli_common import (
    DEMO_FEATURES_DIR,
    DEMO_MODEL_DIR,
    DEMO_PIPELINE,
    DEMO_SAMPLES,
    _json,
    _pipeline_or_demo,
    _print_table,
    _samples_kwargs,
    console,
    err,
)
from ._cli_explain import verify, why
from ._cli_folders import REMOVABLE as REMOVABLE
from ._cli_folders import SCAN_ATTEMPTS as SCAN_ATTEMPTS
from ._cli_folders import STATUSES as STATUSES
from ._cli_folders import clean, status
from .errors import CommandError as CommandError

app = App(
    name="samplepipe",
    help="Fit and apply checkpointed scikit-learn pipelines through Prefect.",
)
# the commands that judge checkpoint folders, defined in their own modules
app.command(status)
app.command(clean)
app.command(why)
app.command(verify)


def _quiet_prefect():
    # Task-level INFO logs would scroll over the progress bar, and a failed
    # run's tracebacks over its one-line message: quiet Prefect's console
    # handler only (the run logs still reach the API, i.e. the run page's Logs
    # tab; PREFECT_LOGGING_LEVEL would drop them before). Setting the variable
    # (e.g. to ERROR) shows them on the console again.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


@contextlib.contextmanager
def _sigterm_stops():
    """Within the block, SIGTERM raises Prefect's `TerminationSignal`.

    Prefect does so within a flow run (the run is marked crashed); outside
    it (while the server starts, while the logs are sent) the default would
    end the process at once, before the run's last logs were sent.
    """
    from prefect.exceptions import TerminationSignal

    def stop(signum, frame):
        raise TerminationSignal(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn(msg):
    err.print(f"warning: {escape(msg)}", soft_wrap=True)


def _checked(options, command):
    """Bad options fail the command before anything starts (exit status 2)."""
    try:
        options.check()
    except (TypeError, ValueError) as exc:
        raise CommandError(f"samplepipe {command}: {exc}", code=2) from exc


def _table(rows, title):
    columns = (
        "step",
        "task",
        "samples",
        "computed",
        "loaded",
        "failed",
        "cached batches",
        "seconds",
    )
    table = Table(title=title)
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("step", "task") else "right"
        )
    for row in rows:
        table.add_row(*(escape(str(row.get(c, ""))) for c in columns))
    return table


@app.command
def run(
    pipeline: str | None = None,
    *,
    samples: str = DEMO_SAMPLES,
    samples_kwargs: str | None = None,
    train_samples: str = DEMO_SAMPLES,
    train_samples_kwargs: str | None = None,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
    batch_size: int = 200,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    max_batches_in_flight: int = 2,
    method: str = "transform",
    on_error: str = "raise",
    locks: str | None = None,
) -> int:
    """Fit PIPELINE on the training samples and transform the samples, via Prefect.

    Without arguments, runs the demo (digits: scaling -> PCA -> classifier
    scores) into ./samplepipe-demo. Run it twice: the second run computes nothing.
    Other folders need PIPELINE: the demo would overwrite the models there.

    Parameters
    ----------
    pipeline
        Import path of a Pipeline or of a function that returns one.
        Required, except for ./samplepipe-demo.
    samples
        Import path of a function that returns the samples to transform.
    samples_kwargs
        JSON keyword arguments for SAMPLES (default: {"subset": "test"} for the
        demo's samples, none for others).
    train_samples
        Import path of a function that returns the training samples.
    train_samples_kwargs
        JSON keyword arguments for TRAIN_SAMPLES (default: {"subset": "train"}
        for the demo's samples, none for others).
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints (one sub-folder per step).
    model_dir
        Folder of the fitted models (one file per step).
    storage_options
        JSON fsspec options for URL folders (s3://...), e.g.
        '{"endpoint_url": "http://127.0.0.1:9000"}'; credentials are better
        given through the environment.
    layout
        files (one <key>.h5 per sample) or shards (one file per batch of
        samples): how the pipeline's plain steps checkpoint.
    batch_size
        Samples per Prefect task run.
    retries
        Retries of a task run that failed with an I/O error.
    retry_delay_seconds
        Seconds between those retries.
    max_batches_in_flight
        Task runs of one step in flight at once.
    method
        What the last step computes: transform, predict, predict_proba,
        predict_log_proba, decision_function or score_samples.
    on_error
        raise (failed samples fail the run, after every other sample is
        checkpointed) or skip (they stay in line as None).
    locks
        Lock URL of the per-batch locks, e.g. redis://host:6379/0 across hosts
        (default: SAMPLEPIPE_LOCKS, else file locks on this host).

    Without PREFECT_API_URL, a temporary local Prefect server runs for the
    command (SAMPLEPIPE_SERVER_TIMEOUT seconds to start, default 120) and stops
    with it, even when the command is killed.
    """
    pipeline = _pipeline_or_demo("run", pipeline, features_dir, model_dir)
    _quiet_prefect()
    import httpx
    from prefect.exceptions import TerminationSignal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import flows
    from .server import ServerError, prefect_api

    options = flows.RunOptions(
        features_dir=features_dir,
        model_dir=model_dir,
        batch_size=batch_size,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        max_batches_in_flight=max_batches_in_flight,
        method=method,
        on_error=on_error,
        locks=locks,
        storage_options=_json(storage_options, "--storage-options") or None,
        layout=layout,
    )
    _checked(options, "run")
    inputs = {
        "pipeline_kwargs": _json(pipeline_kwargs, "--pipeline-kwargs"),
        "samples_kwargs": _samples_kwargs(samples_kwargs, samples, "test"),
        "train_samples_kwargs": _samples_kwargs(
            train_samples_kwargs, train_samples, "train"
        ),
    }
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} batches"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        bars = {}

        def advance(done, total, description):
            if description not in bars:
                bars[description] = progress.add_task(escape(description), total=total)
            progress.update(bars[description], completed=done, total=total)

        flows.progress_callbacks.append(advance)
        try:
            with _sigterm_stops(), prefect_api(on_lost_logs=_warn):
                state = flows.run_pipeline(
                    pipeline,
                    train_samples,
                    samples,
                    return_state=True,
                    **inputs,
                    **options.parameters(),
                )
        except ServerError as exc:
            raise CommandError(f"samplepipe run: {exc}", code=1) from exc
        except httpx.TransportError as exc:
            msg = (
                f"samplepipe run: the Prefect API stopped answering during the run "
                f"({type(exc).__name__}: {exc}); the checkpoints written so far are "
                "kept: run it again once the server answers."
            )
            raise CommandError(msg, code=1) from exc
        except TerminationSignal as exc:
            msg = (
                f"samplepipe run stopped by signal {exc.signal} (SIGTERM); the "
                "checkpoints written so far are kept: run it again to finish."
            )
            raise CommandError(msg, code=128 + exc.signal) from exc
        finally:
            flows.progress_callbacks.remove(advance)
    seconds = time.perf_counter() - t0
    assert state is not None  # return_state=True
    if not state.is_completed():
        try:
            state.result()
        except flows.PipelineRunError as exc:
            err.print(
                f"[bold red]FAILED[/] at step [bold]{escape(str(exc.step))}[/]: "
                f"{escape(str(exc))}",
                soft_wrap=True,
            )
        except Exception as exc:  # bad input, unknown import path, ...
            err.print(f"[bold red]FAILED[/]: {escape(str(exc))}", soft_wrap=True)
        return 1
    rows = state.result()
    _print_table(_table(rows, f"samplepipe run ({seconds:.1f} s)"))
    computed = sum(r["computed"] for r in rows)
    if computed == 0:
        console.print("Nothing computed: every step was loaded from its checkpoints.")
    else:
        console.print(
            f"Computed {computed} step outputs; checkpoints in {escape(features_dir)}."
        )
    return 0


@app.command
def serve(
    pipeline: str = DEMO_PIPELINE,
    *,
    name: str = "samplepipe-demo",
    samples: str = DEMO_SAMPLES,
    samples_kwargs: str | None = None,
    train_samples: str = DEMO_SAMPLES,
    train_samples_kwargs: str | None = None,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
    batch_size: int = 200,
    retries: int = 2,
    retry_delay_seconds: float = 1.0,
    max_batches_in_flight: int = 2,
    method: str = "transform",
    on_error: str = "raise",
    locks: str | None = None,
    cron: str | None = None,
    interval: float | None = None,
    anchor_date: str | None = None,
) -> int:
    """Serve the fit, transform and run deployments (no work pool needed).

    The schedule (--cron or --interval seconds) goes to NAME-run, which fits
    and then transforms, so a transform never runs before its fit; NAME-fit
    and NAME-transform run on demand (e.g. "Quick run" in the Prefect UI).

    Parameters
    ----------
    pipeline
        Import path of the pipeline.
    name
        Prefix of the deployment names.
    samples
        Import path of the samples to transform.
    samples_kwargs
        JSON keyword arguments for SAMPLES (default: {"subset": "test"} for the
        demo's samples, none for others).
    train_samples
        Import path of the training samples.
    train_samples_kwargs
        JSON keyword arguments for TRAIN_SAMPLES (default: {"subset": "train"}
        for the demo's samples, none for others).
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints (a local folder is made absolute).
    model_dir
        Folder of the fitted models (a local folder is made absolute).
    storage_options
        JSON fsspec options for URL folders (s3://...), e.g.
        '{"endpoint_url": "http://127.0.0.1:9000"}'; they are stored with the
        deployments: give credentials through the environment.
    layout
        files (one <key>.h5 per sample) or shards (one file per batch of
        samples): how the pipeline's plain steps checkpoint.
    batch_size
        Samples per Prefect task run.
    retries
        Retries of a task run that failed with an I/O error.
    retry_delay_seconds
        Seconds between those retries.
    max_batches_in_flight
        Task runs of one step in flight at once.
    method
        What the last step of NAME-transform and NAME-run computes: transform,
        predict, predict_proba, predict_log_proba, decision_function or
        score_samples.
    on_error
        raise (failed samples fail the run, after every other sample is
        checkpointed) or skip (they stay in line as None).
    locks
        Lock URL of the per-batch locks, e.g. redis://host:6379/0 across hosts
        (default: SAMPLEPIPE_LOCKS where the deployment runs, else file locks).
    cron
        Cron schedule of NAME-run, e.g. "0 2 * * *".
    interval
        Interval schedule of NAME-run, in seconds.
    anchor_date
        When the --interval schedule starts, in ISO 8601 with a time zone
        (e.g. 2026-12-05T02:00:00+00:00): runs fall at this time plus
        multiples of the interval (default: when serve starts, so the first
        run is one interval later).
    """
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    from .flows import RunOptions, fit_pipeline, run_pipeline, transform_pipeline
    from .storage import normalize_location

    run_options = RunOptions(
        features_dir=normalize_location(features_dir),
        model_dir=normalize_location(model_dir),
        batch_size=batch_size,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        max_batches_in_flight=max_batches_in_flight,
        method=method,
        on_error=on_error,
        locks=locks,
        storage_options=_json(storage_options, "--storage-options") or None,
        layout=layout,
    )
    _checked(run_options, "serve")
    common = {
        "pipeline": pipeline,
        "pipeline_kwargs": _json(pipeline_kwargs, "--pipeline-kwargs"),
    }
    train = {
        "samples": train_samples,
        "samples_kwargs": _samples_kwargs(train_samples_kwargs, train_samples, "train"),
    }
    test = {
        "samples": samples,
        "samples_kwargs": _samples_kwargs(samples_kwargs, samples, "test"),
    }
    schedule = _schedule(cron, interval, anchor_date)
    options: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH}
    deployments: list[Any] = [
        fit_pipeline.to_deployment(
            f"{name}-fit",
            parameters={**common, **run_options.parameters(fit=True), **train},
            **options,
        ),
        transform_pipeline.to_deployment(
            f"{name}-transform",
            parameters={**common, **run_options.parameters(), **test},
            **options,
        ),
        run_pipeline.to_deployment(
            f"{name}-run",
            parameters={
                **common,
                **run_options.parameters(),
                "train_samples": train_samples,
                "train_samples_kwargs": train["samples_kwargs"],
                **test,
            },
            **schedule,
            **options,
        ),
    ]
    prefect_serve(*deployments)
    return 0


def _schedule(
    cron: str | None, interval: float | None, anchor_date: str | None
) -> dict[str, Any]:
    """The schedule keywords of ``to_deployment``; `CommandError` if inconsistent."""
    from prefect.schedules import Cron, Interval

    if anchor_date is None:
        schedule: dict[str, Any] = {}
        if cron is not None:
            schedule["cron"] = cron
        if interval is not None:
            schedule["interval"] = interval
        return schedule
    if interval is None:
        msg = (
            "samplepipe serve: --anchor-date needs --interval (it starts that schedule)"
        )
        raise CommandError(msg, code=2)
    try:
        anchor = datetime.datetime.fromisoformat(anchor_date)
    except ValueError:
        anchor = None
    if anchor is None or anchor.tzinfo is None:
        msg = (
            f"samplepipe serve: --anchor-date {anchor_date!r} is not an ISO 8601 "
            "time with a time zone; give e.g. 2026-12-05T02:00:00+00:00"
        )
        raise CommandError(msg, code=2)
    schedules = [Interval(interval, anchor_date=anchor)]
    if cron is not None:
        schedules.append(Cron(cron))
    return {"schedules": schedules}


def _cwd_on_path():
    """Put the current folder first on ``sys.path``, as ``python -m`` does.

    Returns the entry added, or None if the folder was importable already.
    """
    try:
        cwd = os.getcwd()
    except OSError:  # the current folder was removed
        return None
    if any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        return None
    sys.path.insert(0, cwd)
    return cwd


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``samplepipe`` console script and ``python -m samplepipe``.

    Import paths (``--pipeline mymodule:make_pipeline``) may name modules of
    the current folder, as with ``python -m``.
    """
    # no anonymous usage statistics from the servers we start, unless asked for
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # At exit, skip the garbage collections of interpreter shutdown: with
    # Prefect and scikit-learn loaded they walk ~200,000 objects several
    # times (0.6-1 s of a 5 s cached run). Exit handlers still run (Prefect's
    # flush its logs and events), every file is closed by then, and Python
    # never promised __del__ for objects alive at exit.
    atexit.register(gc.freeze)
    added = _cwd_on_path()
    try:
        code = app(argv, result_action="return_value")
    except CommandError as exc:
        err.print(f"error: {escape(str(exc))}", soft_wrap=True)
        return exc.code
    finally:
        if added is not None and added in sys.path:
            sys.path.remove(added)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
