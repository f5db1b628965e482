"""The ``samplepipe`` command line: run, serve, status, clean.

Built on cyclopts and rich, which Prefect itself depends on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

from cyclopts import App
from rich.console import Console
from rich.table import Table

DEMO_PIPELINE = "samplepipe.examples:demo_pipeline"
DEMO_SAMPLES = "samplepipe.examples:digits_samples"
DEMO_DIR = "samplepipe-demo"

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


def _quiet_prefect():
    # Task-level INFO logs would scroll over the progress bar.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _table(rows, title):
    table = Table(title=title)
    for column in (
        "step",
        "task",
        "samples",
        "computed",
        "loaded",
        "cached batches",
        "seconds",
    ):
        table.add_column(
            column, justify="left" if column in ("step", "task") else "right"
        )
    for row in rows:
        table.add_row(
            *(
                str(row[c])
                for c in (
                    "step",
                    "task",
                    "samples",
                    "computed",
                    "loaded",
                    "cached batches",
                    "seconds",
                )
            )
        )
    return table


@app.command
def run(
    pipeline: str = DEMO_PIPELINE,
    *,
    samples: str = DEMO_SAMPLES,
    samples_kwargs: str = '{"subset": "test"}',
    train_samples: str = DEMO_SAMPLES,
    train_samples_kwargs: str = '{"subset": "train"}',
    pipeline_kwargs: str = "{}",
    features_dir: str = f"{DEMO_DIR}/features",
    model_dir: str = f"{DEMO_DIR}/models",
    batch_size: int = 200,
    retries: int = 2,
):
    """Fit PIPELINE on the training samples and transform the samples, via Prefect.

    Without arguments, runs the demo (digits: scaling -> PCA -> classifier
    scores) into ./samplepipe-demo. Run it twice: the second run computes nothing.

    Parameters
    ----------
    pipeline
        Import path of a Pipeline or of a function that returns one.
    samples
        Import path of a function that returns the samples to transform.
    samples_kwargs
        JSON keyword arguments for SAMPLES.
    train_samples
        Import path of a function that returns the training samples.
    train_samples_kwargs
        JSON keyword arguments for TRAIN_SAMPLES.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints (one sub-folder per step).
    model_dir
        Folder of the fitted models (one file per step).
    batch_size
        Samples per Prefect task run.
    retries
        Retries of a task run that failed with an I/O error.
    """
    _quiet_prefect()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import flows

    kwargs = {
        "pipeline_kwargs": _json(pipeline_kwargs, "--pipeline-kwargs"),
        "samples_kwargs": _json(samples_kwargs, "--samples-kwargs"),
        "train_samples_kwargs": _json(train_samples_kwargs, "--train-samples-kwargs"),
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
                bars[description] = progress.add_task(description, total=total)
            progress.update(bars[description], completed=done, total=total)

        flows.progress_callbacks.append(advance)
        try:
            state = flows.run_pipeline(
                pipeline,
                train_samples,
                samples,
                features_dir,
                model_dir,
                batch_size=batch_size,
                retries=retries,
                return_state=True,
                **kwargs,
            )
        finally:
            flows.progress_callbacks.remove(advance)
    seconds = time.perf_counter() - t0
    if not state.is_completed():
        try:
            state.result()
        except flows.PipelineRunError as exc:
            err.print(f"[bold red]FAILED[/] at step [bold]{exc.step}[/]: {exc}")
        except Exception as exc:  # bad input, unknown import path, ...
            err.print(f"[bold red]FAILED[/]: {exc}")
        return 1
    rows = state.result()
    console.print(_table(rows, f"samplepipe run ({seconds:.1f} s)"))
    computed = sum(r["computed"] for r in rows)
    if computed == 0:
        console.print("Nothing computed: every step was loaded from its checkpoints.")
    else:
        console.print(
            f"Computed {computed} step outputs; checkpoints in {features_dir}."
        )
    return 0


def _steps(pipeline, pipeline_kwargs, features_dir, model_dir):
    from .flows import load_object, prepare_steps

    pipeline = load_object(
        pipeline, _json(pipeline_kwargs, "--pipeline-kwargs"), "pipeline"
    )
    return prepare_steps(pipeline, features_dir, model_dir)


def _scan(steps):
    """Yield ``(name, step, [(path, status, size)])`` with upstream lineage."""
    upstream = None
    for name, step in steps:
        yield name, step, list(step.iter_checkpoints(upstream))
        upstream = step.fingerprint(upstream)


@app.command
def status(
    pipeline: str = DEMO_PIPELINE,
    *,
    pipeline_kwargs: str = "{}",
    features_dir: str = f"{DEMO_DIR}/features",
    model_dir: str = f"{DEMO_DIR}/models",
):
    """Per step: checkpoints valid / stale / corrupt / foreign / temporary, and bytes.

    Reads model headers only; nothing is unpickled.

    Parameters
    ----------
    pipeline
        Import path of the pipeline (as for run).
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    """
    from .wrappers._checkpoint import read_model_header

    table = Table(title=f"checkpoints in {features_dir}")
    columns = ("valid", "stale", "corrupt", "foreign", "temporary")
    for column in ("step", "model", *columns, "bytes"):
        table.add_column(
            column, justify="left" if column in ("step", "model") else "right"
        )
    totals = Counter()
    for name, step, files in _scan(
        _steps(pipeline, pipeline_kwargs, features_dir, model_dir)
    ):
        counts = Counter(status for _, status, _ in files)
        totals.update(counts)
        if step.model_path is None:
            model = "-"
        else:
            model = "present" if read_model_header(step.model_path) else "missing"
        size = sum(s for _, _, s in files)
        table.add_row(name, model, *(str(counts[c]) for c in columns), str(size))
    console.print(table)
    return 0


@app.command
def clean(
    pipeline: str = DEMO_PIPELINE,
    *,
    pipeline_kwargs: str = "{}",
    features_dir: str = f"{DEMO_DIR}/features",
    model_dir: str = f"{DEMO_DIR}/models",
    yes: bool = False,
    dry_run: bool = False,
):
    """Remove stale, corrupt and foreign checkpoints and leftover temporary files.

    Parameters
    ----------
    pipeline
        Import path of the pipeline (as for run).
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints.
    model_dir
        Folder of the fitted models.
    yes
        Remove without asking.
    dry_run
        Only list what would be removed.
    """
    doomed = [
        (path, status, size)
        for _, _, files in _scan(
            _steps(pipeline, pipeline_kwargs, features_dir, model_dir)
        )
        for path, status, size in files
        if status in ("stale", "corrupt", "foreign", "temporary")
    ]
    for path, status, size in doomed:
        console.print(f"{status:9s} {size:10d}  {path}")
    total = sum(size for _, _, size in doomed)
    console.print(f"{len(doomed)} file(s), {total} bytes")
    if dry_run or not doomed:
        return 0
    if not yes:
        if not sys.stdin.isatty():
            err.print("Not removing anything: pass --yes (or --dry-run).")
            return 1
        if input("Remove them? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    from .wrappers._checkpoint import remove_checkpoint_file

    for path, _, _ in doomed:
        remove_checkpoint_file(path)
    console.print(f"Removed {len(doomed)} file(s).")
    return 0


@app.command
def serve(
    pipeline: str = DEMO_PIPELINE,
    *,
    name: str = "samplepipe-demo",
    samples: str = DEMO_SAMPLES,
    samples_kwargs: str = '{"subset": "test"}',
    train_samples: str = DEMO_SAMPLES,
    train_samples_kwargs: str = '{"subset": "train"}',
    pipeline_kwargs: str = "{}",
    features_dir: str = f"{DEMO_DIR}/features",
    model_dir: str = f"{DEMO_DIR}/models",
    batch_size: int = 200,
    retries: int = 2,
    cron: str | None = None,
    interval: float | None = None,
):
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
        JSON keyword arguments for SAMPLES.
    train_samples
        Import path of the training samples.
    train_samples_kwargs
        JSON keyword arguments for TRAIN_SAMPLES.
    pipeline_kwargs
        JSON keyword arguments for PIPELINE.
    features_dir
        Folder of the feature checkpoints (made absolute).
    model_dir
        Folder of the fitted models (made absolute).
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

    common = {
        "pipeline": pipeline,
        "pipeline_kwargs": _json(pipeline_kwargs, "--pipeline-kwargs"),
        "features_dir": os.path.abspath(features_dir),
        "model_dir": os.path.abspath(model_dir),
        "batch_size": batch_size,
        "retries": retries,
    }
    train = {
        "samples": train_samples,
        "samples_kwargs": _json(train_samples_kwargs, "--train-samples-kwargs"),
    }
    test = {
        "samples": samples,
        "samples_kwargs": _json(samples_kwargs, "--samples-kwargs"),
    }
    schedule = {}
    if cron is not None:
        schedule["cron"] = cron
    if interval is not None:
        schedule["interval"] = interval
    options = {"entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [
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


def main(argv=None):
    """Entry point of the ``samplepipe`` console script."""
    code = app(argv, result_action="return_value")
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
