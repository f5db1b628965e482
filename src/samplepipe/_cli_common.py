"""What the samplepipe commands share: demo defaults, consoles, JSON options, steps.

The pipeline a command names becomes its steps here (`_steps`), refused when
it would judge or overwrite folders it did not write (`_pipeline_or_demo`);
`_judged` tells which steps' files cannot be judged for want of a model.
"""

from __future__ import annotations

import json
import os
import shlex

from rich.console import Console

from .errors import CommandError

DEMO_PIPELINE = "samplepipe.examples:demo_pipeline"
DEMO_SAMPLES = "samplepipe.examples:digits_samples"
DEMO_DIR = "samplepipe-demo"
DEMO_FEATURES_DIR = f"{DEMO_DIR}/features"
DEMO_MODEL_DIR = f"{DEMO_DIR}/models"

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
