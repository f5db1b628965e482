"""The ``samplepipe`` command line: run, serve, status, clean, why, verify.

Built on cyclopts and rich, which Prefect itself depends on.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import shlex
import signal
import sys
import time
from collections import Counter
from typing import Any

from cyclopts import App
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CommandError as CommandError

DEMO_PIPELINE = "samplepipe.examples:demo_pipeline"
DEMO_SAMPLES = "samplepipe.examples:digits_samples"
DEMO_DIR = "samplepipe-demo"
DEMO_FEATURES_DIR = f"{DEMO_DIR}/features"
DEMO_MODEL_DIR = f"{DEMO_DIR}/models"
# A scan that met a file vanishing under it (a job writing into the folder)
# starts again, at most this many times.
SCAN_ATTEMPTS = 20
# What status counts, in its columns; clean removes only REMOVABLE files.
STATUSES = ("valid", "stale", "corrupt", "foreign", "unknown", "temporary", "writing")
REMOVABLE = ("stale", "corrupt", "foreign", "temporary")

app = App(
    name="samplepipe",
    help="Fit and apply checkpointed scikit-learn pipelines through Prefect.",
)
console = Console()
err = Console(stderr=True)


def _json(value, option):
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        msg = f'{option} must be a JSON object, e.g. \'{{"subset": "test"}}\': {exc}'
        raise SystemExit(f"error: {msg}") from exc
    if not isinstance(obj, dict):
        raise SystemExit(f"error: {option} must be a JSON object, got {value!r}")
    return obj


def _samples_kwargs(value, samples, subset):
    """--(train-)samples-kwargs; unset: the demo's subset for its samples, else none."""
    if value is not None:
        option = "--samples-kwargs" if subset == "test" else "--train-samples-kwargs"
        return _json(value, option)
    return {"subset": subset} if samples == DEMO_SAMPLES else {}


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


def _print_table(table):
    """Print ``table`` whole: folded to fit a terminal, else at its natural width.

    Output to a file or a pipe (80 columns by default) is not cut short.
    """
    if console.is_terminal:
        console.print(table)
        return
    options = console.options.update_width(10_000)
    width = console.measure(table, options=options).maximum
    Console(file=console.file, width=max(width, console.width)).print(table)


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
    method: str = "transform",
    on_error: str = "raise",
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
    method
        What the last step computes: transform, predict, predict_proba,
        predict_log_proba, decision_function or score_samples.
    on_error
        raise (failed samples fail the run, after every other sample is
        checkpointed) or skip (they stay in line as None).

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

    kwargs = {
        "pipeline_kwargs": _json(pipeline_kwargs, "--pipeline-kwargs"),
        "samples_kwargs": _samples_kwargs(samples_kwargs, samples, "test"),
        "train_samples_kwargs": _samples_kwargs(
            train_samples_kwargs, train_samples, "train"
        ),
        "storage_options": _json(storage_options, "--storage-options") or None,
        "layout": layout,
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
                    features_dir,
                    model_dir,
                    batch_size=batch_size,
                    retries=retries,
                    method=method,
                    on_error=on_error,
                    return_state=True,
                    **kwargs,
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


def _steps(command, pipeline, pipeline_kwargs, features_dir, model_dir, store):
    """``[(name, CheckpointWrapper)]`` of PIPELINE; a bad PIPELINE stops the command.

    ``store`` is ``(--storage-options, --layout)``.
    """
    from .flows import LAYOUTS, load_object, prepare_steps

    kwargs = _json(pipeline_kwargs, "--pipeline-kwargs")
    options, layout = _json(store[0], "--storage-options"), store[1]
    try:
        if layout not in LAYOUTS:
            msg = f"--layout {layout!r} is not one of {list(LAYOUTS)}."
            raise ValueError(msg)
        pipeline = load_object(pipeline, kwargs, "pipeline")
        return prepare_steps(pipeline, features_dir, model_dir, options or None, layout)
    except (ImportError, TypeError, ValueError) as exc:
        msg = f"samplepipe {command}: {exc}"
        raise CommandError(msg, code=2) from exc


def _same_folder(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


_WHY_A_PIPELINE = {
    "run": (
        "the demo pipeline would be fitted there and overwrite the models and "
        "checkpoints in these folders"
    ),
    "status": "checkpoints can only be judged by the pipeline that wrote them",
    "clean": "checkpoints can only be judged by the pipeline that wrote them",
}


def _pipeline_or_demo(command, pipeline, features_dir, model_dir):
    """PIPELINE, or the demo's for the demo's own folders; else refuse.

    Judging a folder with a pipeline that did not write it calls every file
    stale, and ``clean`` would delete them all; ``run`` would refit the demo
    over a user's model files.
    """
    if pipeline is not None:
        return pipeline
    if _same_folder(features_dir, DEMO_FEATURES_DIR) and _same_folder(
        model_dir, DEMO_MODEL_DIR
    ):
        return DEMO_PIPELINE
    msg = (
        f"samplepipe {command} got no pipeline for features_dir {features_dir!r} "
        f"and model_dir {model_dir!r}; {_WHY_A_PIPELINE[command]} (only "
        f"./{DEMO_DIR} defaults to the demo). Name it: samplepipe {command} "
        f"--pipeline mymodule:make_pipeline "
        f"--features-dir {shlex.quote(features_dir)} "
        f"--model-dir {shlex.quote(model_dir)}"
    )
    raise CommandError(msg, code=2)


def _unreadable_model(step):
    """Why the files of ``step`` cannot be judged (no usable model), or None.

    The identity of a step that needs fitting includes its fitted state; without
    it every file of the step would look stale. Only the model's header is read:
    nothing is unpickled.
    """
    from .storage import read_model_header

    if step.has_model_state():
        return None
    if step.model_path is None:
        return "no model_path"
    path = os.fspath(step.model_path)
    if read_model_header(path, step.storage_options) is None:
        return f"no model at {path}"
    return f"no model at {path} for these parameters"


def _judged(steps):
    """Yield ``(name, step, unknown)`` for each step.

    ``unknown`` is None, or why the files of the step cannot be judged: its
    fitted model, or that of an earlier step, cannot be read. (A step's scan
    judges it alone; a later step is kept too, as its inputs came from a step
    whose model is missing.)
    """
    unknown = None
    for name, step in steps:
        if unknown is None:
            unknown = _unreadable_model(step)
        yield name, step, unknown


def _scanned(name, step, scan):
    """``[(path, status, size)]`` from ``scan()``; scans again if a file vanished.

    Files that vanished while being judged (status ``missing``) are left out.
    """
    last = None
    for attempt in range(SCAN_ATTEMPTS):
        try:
            return [f for f in scan() if f[1] != "missing"]
        except FileNotFoundError as exc:
            # A writer renamed or removed a file between listing and reading
            # it; the partial scan is dropped and the folder scanned again.
            last = exc
            time.sleep(0.005 * attempt)
    msg = (
        f"samplepipe could not scan step {name!r}: "
        f"{getattr(last, 'filename', None)!r} vanished "
        f"during each of {SCAN_ATTEMPTS} scans of {os.fspath(step.features_dir)!r} "
        "(a job is removing files there, or it is a broken symbolic link). Run "
        "again when the job is done, or remove the broken link."
    )
    raise CommandError(msg) from last


def _not_judged(files):
    """``files`` of a step that cannot be judged: all ``unknown`` but temporaries."""
    return [
        (path, s if s in ("temporary", "writing") else "unknown", size)
        for path, s, size in files
    ]


@app.command
def status(
    pipeline: str | None = None,
    *,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
) -> int:
    """Per step: checkpoints valid / stale / corrupt / foreign / unknown / temporary.

    Also files being written and bytes. Reads model headers only; nothing is
    unpickled. A step whose fitted model cannot be read (and every step after
    it) shows "?" for valid, stale, corrupt and foreign: its files are unknown.
    Unknown files (also readable files samplepipe did not write) are never
    removed by clean.

    Parameters
    ----------
    pipeline
        Import path of the pipeline that wrote the checkpoints (as for run),
        e.g. mymodule:make_pipeline. Required, except for ./samplepipe-demo.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    storage_options
        JSON fsspec options for URL folders (s3://...), e.g.
        '{"endpoint_url": "http://127.0.0.1:9000"}'; credentials are better
        given through the environment.
    layout
        files (one <key>.h5 per sample) or shards (one file per batch of
        samples): how the pipeline's plain steps checkpoint.
    """
    from .storage import read_model_header

    pipeline = _pipeline_or_demo("status", pipeline, features_dir, model_dir)
    steps = _steps(
        "status",
        pipeline,
        pipeline_kwargs,
        features_dir,
        model_dir,
        (storage_options, layout),
    )
    table = Table(title=f"checkpoints in {escape(features_dir)}")
    columns = STATUSES
    for column in ("step", "model", *columns, "bytes"):
        table.add_column(
            column,
            justify="left" if column in ("step", "model") else "right",
            overflow="fold",
        )
    notes = []
    for name, step, unknown in _judged(steps):
        files = _scanned(name, step, step.iter_checkpoints)
        if unknown is not None:
            files = _not_judged(files)
        counts = Counter(status for _, status, _ in files)
        cells = [str(counts[c]) for c in columns]
        if unknown is not None:
            cells[:4] = ["?"] * 4  # valid, stale, corrupt, foreign
            notes.append(
                f"{name}: unknown ({unknown}): {counts['unknown']} file(s) not "
                "judged; clean keeps them."
            )
        if step.model_path is None:
            model = "-"
        else:
            header = read_model_header(step.model_path, step.storage_options)
            model = "present" if header else "missing"
        size = sum(s for _, _, s in files)
        table.add_row(escape(name), model, *cells, str(size))
    _print_table(table)
    for note in notes:
        console.print(escape(note), soft_wrap=True)
    return 0


@app.command
def clean(
    pipeline: str | None = None,
    *,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
    yes: bool = False,
    dry_run: bool = False,
) -> int:
    """Remove stale, corrupt and foreign checkpoints and leftover temporary files.

    Reads model headers only; nothing is unpickled. A step whose fitted model
    cannot be read (a missing or mistyped --model-dir) cannot tell valid files
    from stale ones: its files and those of every later step are kept and
    listed as "unknown (no model at PATH)". Each file is judged again right
    before it is removed, and kept if it changed since it was listed.

    Exit status: 0 when done; 1 when files of such a step were kept, when a
    file kept vanishing during the scan, or when nothing was removed because
    --yes was missing; 2 when PIPELINE is missing outside ./samplepipe-demo or
    cannot be imported.

    Parameters
    ----------
    pipeline
        Import path of the pipeline that wrote the checkpoints (as for run),
        e.g. mymodule:make_pipeline. Required, except for ./samplepipe-demo.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    storage_options
        JSON fsspec options for URL folders (s3://...), e.g.
        '{"endpoint_url": "http://127.0.0.1:9000"}'; credentials are better
        given through the environment.
    layout
        files (one <key>.h5 per sample) or shards (one file per batch of
        samples): how the pipeline's plain steps checkpoint.
    yes
        Remove without asking.
    dry_run
        Only list what would be removed.
    """
    pipeline = _pipeline_or_demo("clean", pipeline, features_dir, model_dir)
    steps = _steps(
        "clean",
        pipeline,
        pipeline_kwargs,
        features_dir,
        model_dir,
        (storage_options, layout),
    )
    doomed, kept = [], []  # doomed: (name, step, files); kept: (name, why, files)
    for name, step, unknown in _judged(steps):
        if unknown is not None:
            kept.append((name, unknown, _scanned(name, step, step.iter_checkpoints)))
            continue

        def listing(step=step):
            return step.remove_checkpoints(statuses=REMOVABLE, dry_run=True)

        files = _scanned(name, step, listing)
        if files:
            doomed.append((name, step, files))
    listed = [f for _, _, files in doomed for f in files]
    for path, status, size in listed:
        console.print(f"{status:9s} {size:10d}  {escape(path)}", soft_wrap=True)
    for name, unknown, files in kept:
        console.print(
            escape(f"{name}: unknown ({unknown}); {len(files)} file(s) kept"),
            soft_wrap=True,
        )
    total = sum(size for _, _, size in listed)
    console.print(f"{len(listed)} file(s), {total} bytes")
    code = 0
    if any(files for _, _, files in kept):
        names = ", ".join(repr(name) for name, _, files in kept if files)
        msg = (
            f"samplepipe clean kept the files of step(s) {names}: without a "
            "readable fitted model it cannot tell valid files from stale ones. "
            f"Got --model-dir {model_dir!r}; pass the --model-dir that holds the "
            "models (or run the pipeline first)."
        )
        err.print(f"warning: {escape(msg)}", soft_wrap=True)
        code = 1
    if dry_run or not listed:
        return code
    if not yes:
        if not sys.stdin.isatty():
            err.print("Not removing anything: pass --yes (or --dry-run).")
            return 1
        if input("Remove them? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    removed = []
    for name, step, _ in doomed:

        def removal(step=step):
            return step.remove_checkpoints(statuses=REMOVABLE)

        removed += _scanned(name, step, removal)
    gone = {path for path, _, _ in removed}
    for path, _, _ in listed:
        if path not in gone:
            console.print(
                f"kept {escape(path)}: it changed since it was listed", soft_wrap=True
            )
    was_listed = {path for path, _, _ in listed}
    for path, status, size in removed:
        if path not in was_listed:
            console.print(
                f"{status:9s} {size:10d}  {escape(path)} (found while removing)",
                soft_wrap=True,
            )
    console.print(f"Removed {len(removed)} file(s).")
    return code


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
    cron: str | None = None,
    interval: float | None = None,
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
    cron
        Cron schedule of NAME-run, e.g. "0 2 * * *".
    interval
        Interval schedule of NAME-run, in seconds.
    """
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    from .flows import fit_pipeline, run_pipeline, transform_pipeline
    from .storage import normalize_location

    common = {
        "pipeline": pipeline,
        "pipeline_kwargs": _json(pipeline_kwargs, "--pipeline-kwargs"),
        "features_dir": normalize_location(features_dir),
        "model_dir": normalize_location(model_dir),
        "storage_options": _json(storage_options, "--storage-options") or None,
        "layout": layout,
        "batch_size": batch_size,
        "retries": retries,
    }
    train = {
        "samples": train_samples,
        "samples_kwargs": _samples_kwargs(train_samples_kwargs, train_samples, "train"),
    }
    test = {
        "samples": samples,
        "samples_kwargs": _samples_kwargs(samples_kwargs, samples, "test"),
    }
    schedule: dict[str, Any] = {}
    if cron is not None:
        schedule["cron"] = cron
    if interval is not None:
        schedule["interval"] = interval
    options: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH}
    deployments: list[Any] = [
        fit_pipeline.to_deployment(
            f"{name}-fit", parameters={**common, **train}, **options
        ),
        transform_pipeline.to_deployment(
            f"{name}-transform", parameters={**common, **test}, **options
        ),
        run_pipeline.to_deployment(
            f"{name}-run",
            parameters={
                **common,
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


def _inspected_steps(command, pipeline, options, step_name):
    """The steps of PIPELINE for why/verify, each judged from its model header.

    ``options`` holds --pipeline-kwargs, --features-dir, --model-dir,
    --storage-options and --layout. A step whose fitted model cannot be read
    stops the command (exit 2): its checkpoints cannot be judged.
    """
    pipeline_kwargs, features_dir, model_dir, storage_options, layout = options
    if not os.path.isdir(features_dir) and "://" not in features_dir:
        msg = (
            f"samplepipe {command}: features_dir {features_dir!r} does not exist; "
            "name the folder the pipeline wrote (--features-dir)."
        )
        raise CommandError(msg, code=2)
    pipeline = _pipeline_or_demo(command, pipeline, features_dir, model_dir)
    steps = _steps(
        command,
        pipeline,
        pipeline_kwargs,
        features_dir,
        model_dir,
        (storage_options, layout),
    )
    names = [name for name, _ in steps]
    if step_name is not None and step_name not in names:
        msg = f"samplepipe {command}: no step {step_name!r}; the steps are {names}."
        raise CommandError(msg, code=2)
    for name, _step, unknown in _judged(steps):
        if unknown is not None:
            msg = (
                f"samplepipe {command}: step {name!r} cannot be judged ({unknown}); "
                "fit the pipeline first (samplepipe run), or name the pipeline "
                "and --model-dir that wrote these checkpoints."
            )
            raise CommandError(msg, code=2)
    return steps


def _command_samples(command, samples, samples_kwargs):
    from .flows import load_object

    kwargs = _samples_kwargs(samples_kwargs, samples, "test")
    try:
        loaded = list(load_object(samples, kwargs, "samples"))
    except (ImportError, TypeError, ValueError) as exc:
        raise CommandError(f"samplepipe {command}: {exc}", code=2) from exc
    return loaded


def _check_key(command, key, samples):
    if key is not None and key not in {getattr(s, "key", None) for s in samples}:
        msg = f"samplepipe {command}: no sample has key {key!r} (--key)."
        raise CommandError(msg, code=2)


@app.command
def why(
    pipeline: str | None = None,
    *,
    samples: str = DEMO_SAMPLES,
    samples_kwargs: str | None = None,
    step: str | None = None,
    key: str | None = None,
    examples: int = 3,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
) -> int:
    """Per step: how many samples are reused or recomputed, and why.

    For each step of PIPELINE, counts per reason (same, code, parameter,
    input, fitted, format, library, missing, damaged), then examples naming
    what changed: the function whose code changed, the parameter and its
    values, the input, the library and its versions. Nothing is computed,
    written, removed or unpickled (models are judged by their headers).

    Parameters
    ----------
    pipeline
        Import path of the pipeline (as for run), e.g. mymodule:make_pipeline.
        Required, except for ./samplepipe-demo.
    samples
        Import path of the samples (as for run).
    samples_kwargs
        JSON keyword arguments for SAMPLES.
    step
        Explain this step only (the earlier ones are still followed).
    key
        Explain this sample only.
    examples
        Examples shown per reason.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    storage_options
        JSON fsspec options for URL folders.
    layout
        files or shards, as for run.
    """
    from .wrappers._explain import count

    options = (pipeline_kwargs, features_dir, model_dir, storage_options, layout)
    steps = _inspected_steps("why", pipeline, options, step)
    current = _command_samples("why", samples, samples_kwargs)
    _check_key("why", key, current)
    for name, wrapper in steps:
        explained = wrapper.explain(current)
        if step is None or name == step:
            if key is not None:
                explained = [e for e in explained if e.key == key]
            table = Table(title=f"why: step {escape(name)} ({len(explained)} samples)")
            for column in ("action", "reason", "samples", "e.g.", "detail"):
                table.add_column(column, overflow="fold")
            for reason, n in count(explained).items():
                limit = 1 if reason == "same" else examples
                shown = [e for e in explained if e.reason == reason][:limit]
                for j, e in enumerate(shown):
                    table.add_row(
                        e.action if j == 0 else "",
                        reason if j == 0 else "",
                        str(n) if j == 0 else "",
                        escape(e.key),
                        escape(e.detail),
                    )
            _print_table(table)
        current = wrapper.planned_outputs(current)
    return 0


@app.command
def verify(
    pipeline: str | None = None,
    *,
    samples: str = DEMO_SAMPLES,
    samples_kwargs: str | None = None,
    fraction: float = 0.01,
    seed: int | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    pipeline_kwargs: str = "{}",
    features_dir: str = DEMO_FEATURES_DIR,
    model_dir: str = DEMO_MODEL_DIR,
    storage_options: str = "{}",
    layout: str = "files",
) -> int:
    """Recompute a random fraction of the reused samples and compare; 1 if any differ.

    For each step, FRACTION of the samples whose checkpoint would be reused
    (at least one) are recomputed in memory from their inputs and compared
    with their checkpoints, exactly or within --rtol/--atol. A mismatch
    means a step that is not deterministic, or one that depends on something
    its identity cannot see. Nothing is written or removed; fitted models
    are loaded (unpickled) only when their header matches, as fit would.

    Parameters
    ----------
    pipeline
        Import path of the pipeline (as for run). Required, except for the demo.
    samples
        Import path of the samples (as for run).
    samples_kwargs
        JSON keyword arguments for SAMPLES.
    fraction
        Share of the reused samples to recompute per step, in (0, 1].
    seed
        Seed of the random choice.
    rtol
        Relative tolerance for floats (0: exact).
    atol
        Absolute tolerance for floats (0: exact).
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    storage_options
        JSON fsspec options for URL folders.
    layout
        files or shards, as for run.
    """

    if not 0.0 < fraction <= 1.0:
        msg = f"samplepipe verify: --fraction {fraction} is not in (0, 1]."
        raise CommandError(msg, code=2)
    options = (pipeline_kwargs, features_dir, model_dir, storage_options, layout)
    steps = _inspected_steps("verify", pipeline, options, None)
    current = _command_samples("verify", samples, samples_kwargs)
    table = Table(title=f"verify ({fraction:g} of the reused samples per step)")
    for column in ("step", "reused", "checked", "mismatches", "e.g."):
        table.add_column(column, overflow="fold")
    failed = False
    for name, wrapper in steps:
        if not wrapper.__sklearn_is_fitted__() and not wrapper.load_model():
            msg = f"samplepipe verify: step {name!r} has no model to load."
            raise CommandError(msg, code=2)
        report = wrapper.verify(
            current, fraction=fraction, seed=seed, rtol=rtol, atol=atol
        )
        failed = failed or bool(report.mismatches)
        table.add_row(
            escape(name),
            str(report.reused),
            str(report.checked),
            str(len(report.mismatches)),
            escape(", ".join(report.mismatches[:5])),
        )
        current = wrapper.planned_outputs(current)
    _print_table(table)
    if failed:
        console.print(
            "Mismatches: a step is not deterministic, or depends on something its "
            "identity cannot see (declare a version: see docs/concepts/identity.md)."
        )
        return 1
    console.print("Every checked sample matches its checkpoint.")
    return 0


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
