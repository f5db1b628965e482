"""``samplepipe why`` and ``samplepipe verify`` (issue 24), on a pipeline of the user's.

The checkpoints are written with the flows' own layout (`prepare_steps`:
``features_dir/<step>/``, ``model_dir/<step>.pkl``) in this process; the
commands run in-process through ``samplepipe.cli.main``, as the console
script does.
"""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest

from samplepipe import CheckpointWarning
from samplepipe.cli import main

PIPELINE = """
import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
import samplepipe as sp

OFFSET_FILE = None  # a file the last step reads: a dependency without identity


def times(X, factor=1.0):
    return np.asarray(X) * factor


def plus_file(X):
    with open(OFFSET_FILE) as f:
        return np.asarray(X) + float(f.read())


@sp.factory
def make_pipeline(factor=2.0, offset_file=None):
    global OFFSET_FILE
    OFFSET_FILE = offset_file
    steps = [
        ("scale", StandardScaler()),
        ("times", FunctionTransformer(times, kw_args={"factor": factor})),
    ]
    if offset_file:
        steps.append(("offset", FunctionTransformer(plus_file)))
    return Pipeline(steps)


@sp.factory
def make_samples():
    X = np.random.default_rng(0).normal(size=(12, 3))
    return [sp.Sample(x, key=f"s{i:02d}") for i, x in enumerate(X)]
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The user's module on the path, and its pipeline fitted and applied once."""
    from samplepipe.flows import prepare_steps

    (tmp_path / "why_pipeline.py").write_text(textwrap.dedent(PIPELINE))
    offset = tmp_path / "offset.txt"
    offset.write_text("1")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    sys.modules.pop("why_pipeline", None)
    import why_pipeline

    features, models = tmp_path / "features", tmp_path / "models"
    steps = prepare_steps(
        why_pipeline.make_pipeline(offset_file=str(offset)), features, models
    )
    current = why_pipeline.make_samples()
    for _, step in steps:
        current = step.fit(current).transform(current)
    yield {
        "root": tmp_path,
        "offset": offset,
        "options": {
            "--pipeline": "why_pipeline:make_pipeline",
            "--samples": "why_pipeline:make_samples",
            "--features-dir": str(features),
            "--model-dir": str(models),
        },
        "kwargs": f'{{"offset_file": "{offset}"}}',
    }
    sys.modules.pop("why_pipeline", None)


def arguments(project, **changes):
    """The command's options, with ``changes`` (``model_dir=...``) applied."""
    options = dict(project["options"])
    options["--pipeline-kwargs"] = project["kwargs"]
    for name, value in changes.items():
        options["--" + name.replace("_", "-")] = value
    return [x for pair in options.items() for x in pair]


def files_of(root):
    return sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


def run(capsys, *argv):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # nothing recomputed
        code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_why_counts_reasons_per_step_and_names_the_parameter(project, capsys):
    before = files_of(project["root"])
    kwargs = project["kwargs"]
    code, out, _ = run(capsys, "why", *arguments(project))
    assert code == 0
    for step in ("scale", "times", "offset"):
        assert f"why: step {step} (12 samples)" in out
    assert out.count("│ same ") == 3 and "recompute" not in out

    changed = kwargs.replace("{", '{"factor": 3.0, ')
    changed_args = arguments(project, pipeline_kwargs=changed)
    code, out, _ = run(capsys, "why", *changed_args)
    assert code == 0
    times = out[out.index("why: step times") : out.index("why: step offset")]
    assert "parameter" in times and "12" in times
    assert "{'factor': 2.0} to {'factor': 3.0}" in times.replace("\n", "")
    after_times = out[out.index("why: step offset") :]
    assert "input" in after_times and "earlier step" in after_times.replace("\n", "")

    code, out, _ = run(capsys, "why", *changed_args, "--step", "times", "--key", "s03")
    assert code == 0
    assert "why: step times (1 samples)" in out and "why: step scale" not in out
    assert files_of(project["root"]) == before  # nothing written


def test_verify_passes_then_finds_the_file_the_identity_cannot_see(project, capsys):
    args = arguments(project)
    before = files_of(project["root"])
    code, out, _ = run(capsys, "verify", *args, "--fraction", "0.5", "--seed", "1")
    assert code == 0, out
    assert "Every checked sample matches its checkpoint." in out
    project["offset"].write_text("5")
    code, out, _ = run(capsys, "verify", *args, "--fraction", "0.5", "--seed", "1")
    assert code == 1
    row = [line for line in out.splitlines() if "offset" in line][0]
    assert "│ 12 " in row and "│ 6 " in row  # reused, checked, and 6 mismatches
    assert row.count("│ 6") == 2
    offset = project["offset"]
    assert [f for f in files_of(project["root"]) if f[0] != offset] == [
        f for f in before if f[0] != offset
    ]


@pytest.mark.parametrize(
    "commands, change, message",
    [
        (["why"], {"step": "nope"}, "no step 'nope'"),
        (["why"], {"key": "nope"}, "no sample has key 'nope'"),
        (["why", "verify"], {"model_dir": "/nonexistent/m"}, "(no model at"),
        (["why", "verify"], {"features_dir": "/nonexistent/f"}, "does not exist"),
        (["verify"], {"fraction": "0"}, "--fraction 0.0 is not in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(project, capsys, commands, change, message):
    args = arguments(project, **change)
    before = files_of(project["root"])
    for command in commands:
        code, _, err = run(capsys, command, *args)
        assert code == 2
        assert message in err.replace("\n", "") and err.count("\n") <= 3, err
    assert files_of(project["root"]) == before
