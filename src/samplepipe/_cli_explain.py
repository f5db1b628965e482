"""``samplepipe why`` and ``samplepipe verify``: why samples are reused, and a check.

``why`` counts per step the samples reused or recomputed and names what
changed; ``verify`` recomputes a fraction of the reused samples and compares.
Neither writes nor removes anything.
"""

from __future__ import annotations

import os

from rich.markup import escape
from rich.table import Table

from ._cli_common import (
    DEMO_FEATURES_DIR,
    DEMO_MODEL_DIR,
    DEMO_SAMPLES,
    _judged,
    _pipeline_or_demo,
    _print_table,
    _samples_kwargs,
    _steps,
    console,
)
from .errors import CommandError


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
