"""Safety of ``samplepipe status`` and ``clean`` on real folders.

Checkpoints are written by the wrappers themselves (no Prefect run), then the
real command line judges them, in-process through ``samplepipe.cli.main`` or in
a subprocess as a user runs it.
"""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import types
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from samplepipe.cli import main
from samplepipe.storage.files import HOST_TAG

from .conftest import PYTHON_M, SCRIPT, command_env, random_samples_options, samplepipe

pytestmark = pytest.mark.slow  # command-line runs in subprocesses

USER_MODULE = textwrap.dedent(
    '''
    """A user's pipeline whose step names are those of the demo."""

    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from samplepipe import factory
    from samplepipe.testing import CountingTransformer


    @factory
    def make_pipeline():
        return Pipeline(
            [
                ("scale", StandardScaler(with_std=False)),
                ("pca", PCA(n_components=2, random_state=0)),
                ("scores", CountingTransformer(offset=2.0)),
            ]
        )


    @factory
    def odd_names():
        return Pipeline([("a[red]b", FunctionTransformer()), ("c[bold]d", PCA(2))])
    '''
)
KEYS = [f"scan/{i:03d}" for i in range(1, 30)]
MARKED_KEYS = ["scan[left]/001", "scan[/]/002", "scan/003"]
PIPE = ["--pipeline", "userpipe:make_pipeline"]
DIRS = ["--features-dir", "features", "--model-dir", "models"]


def samples(keys):
    from samplepipe.wrappers import Sample

    return [
        Sample(np.arange(4.0) * (i + 1) + i % 3, key=k, target=i % 2)
        for i, k in enumerate(keys)
    ]


def build(pipeline, features, models, X):
    """Fit and transform ``pipeline`` step by step with checkpoints (no Prefect)."""
    from samplepipe.flows import prepare_steps

    steps = prepare_steps(pipeline, features, models)
    for _, step in steps:
        X = step.fit_transform(X)


def dead_pid():
    """The process id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*.h5"))


def cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``samplepipe.cli.main(argv)``."""
    try:
        code = main(argv)
    except SystemExit as exc:  # what the console script would turn into an exit
        code = exc.code if isinstance(exc.code, int) else 1
        print(exc.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """tmp_path holding userpipe.py, features/ and models/ of a run of it."""
    (tmp_path / "userpipe.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import userpipe

    build(userpipe.make_pipeline(), "features", "models", samples(KEYS))
    yield tmp_path
    sys.modules.pop("userpipe", None)


# -- 1. no pipeline named: never judge a user's folder with the demo ---------
@pytest.mark.parametrize(
    "argv",
    [["clean", "--yes"], ["clean", "--dry-run"], ["status"]],
    ids=["clean", "clean-dry-run", "status"],
)
def test_no_pipeline_outside_the_demo_folder_refuses(user_dir, capsys, argv):
    before = snapshot(user_dir / "features")
    assert len(before) == 3 * len(KEYS)
    code, out, err = cli([*argv, *DIRS], capsys)
    assert code == 2
    message = " ".join(err.split())
    assert "got no pipeline for features_dir 'features'" in message
    assert "--pipeline mymodule:make_pipeline" in message
    assert "stale" not in out
    assert snapshot(user_dir / "features") == before


def test_no_pipeline_in_the_demo_folder_uses_the_demo(tmp_path, monkeypatch, capsys):
    from samplepipe.examples import demo_pipeline, digits_samples

    monkeypatch.chdir(tmp_path)
    X = digits_samples("train", n=60)
    build(demo_pipeline(), "samplepipe-demo/features", "samplepipe-demo/models", X)
    before = snapshot(tmp_path / "samplepipe-demo")
    code, out, _ = cli(["status"], capsys)
    assert code == 0 and "│ pca " in out
    row = next(line for line in out.splitlines() if "│ pca " in line)
    assert [c.strip() for c in row.split("│") if c.strip()][:4] == [
        "pca",
        "present",
        "60",
        "0",
    ]
    code, out, _ = cli(["clean", "--yes"], capsys)
    assert code == 0 and "0 file(s), 0 bytes" in out
    assert snapshot(tmp_path / "samplepipe-demo") == before


@pytest.mark.parametrize(
    "dirs",
    [DIRS, ["--features-dir", "features"], ["--model-dir", "models"]],
    ids=["both", "features-dir", "model-dir"],
)
def test_run_without_pipeline_outside_the_demo_folder_refuses(user_dir, capsys, dirs):
    files = [*(user_dir / "features").rglob("*.h5"), *(user_dir / "models").iterdir()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    code, _, err = cli(["run", *dirs], capsys)
    assert code == 2
    message = " ".join(err.split())
    assert "samplepipe run got no pipeline for features_dir" in message
    assert "would be fitted there and overwrite the models" in message
    assert "samplepipe run --pipeline mymodule:make_pipeline" in message
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    assert not (user_dir / "samplepipe-demo").exists()


@pytest.mark.parametrize("command", [["status"], ["clean", "--yes"]])
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no.such[/]module:pipe", "cannot import module 'no.such[/]module'"),
        ("userpipe:no_such", "module 'userpipe' has no 'no_such'"),
        ("userpipe", "is not an import path"),
        ("samplepipe.cli:DEMO_DIR", "must be a scikit-learn Pipeline"),
    ],
    ids=["no-module", "no-attribute", "no-colon", "not-a-pipeline"],
)
def test_bad_import_path_is_a_one_line_error(user_dir, capsys, command, spec, expected):
    before = snapshot(user_dir / "features")
    code, out, err = cli([*command, spec, *DIRS], capsys)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: samplepipe {command[0]}: ")
    assert expected in lines[0]
    assert snapshot(user_dir / "features") == before


def test_bad_import_path_is_a_one_line_error_in_a_subprocess(user_dir):
    result = samplepipe(
        "status",
        "userpipe:no_such",
        *DIRS,
        cwd=user_dir,
        env=command_env(user_dir),
        command=PYTHON_M,
    )
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: samplepipe status: pipeline=")
    assert "module 'userpipe' has no 'no_such'" in " ".join(result.stderr.split())


# -- 2. a model that cannot be read makes the files unknown, not stale -------
def _break_models(case):
    if case == "mistyped-model-dir":
        return ["--model-dir", "modles"], "modles/scale.pkl", []
    if case == "pca-model-deleted":
        os.unlink("models/pca.pkl")
        return ["--model-dir", "models"], "models/pca.pkl", ["scale"]
    if case == "pca-model-corrupt":
        Path("models/pca.pkl").write_bytes(b"samplepipe-model\n{not json")
        return ["--model-dir", "models"], "models/pca.pkl", ["scale"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["mistyped-model-dir", "pca-model-deleted", "pca-model-corrupt"]
)
def test_clean_keeps_steps_whose_model_cannot_be_read(user_dir, capsys, case):
    features = user_dir / "features"
    # a corrupt file in every step: only judged steps may lose theirs
    for step in ("scale", "pca", "scores"):
        (features / step / "scan" / "999.h5").write_bytes(b"garbage")
    model_dir, missing, judged = _break_models(case)
    before = snapshot(features)
    argv = ["clean", *PIPE, "--features-dir", "features", *model_dir, "--yes"]
    code, out, err = cli(argv, capsys)
    text = " ".join((out + err).split())
    assert code == 1
    unknown = [s for s in ("scale", "pca", "scores") if s not in judged]
    for step in unknown:
        assert f"{step}: unknown (no model at {missing})" in text
        assert (features / step / "scan" / "999.h5").exists()
    for step in judged:
        assert f"{step}: unknown" not in text
        assert not (features / step / "scan" / "999.h5").exists()
    assert "pass the --model-dir that holds the models" in text
    after = snapshot(features)
    removed = [f"{step}/scan/999.h5" for step in judged]
    assert after == [p for p in before if p not in removed]


def test_status_shows_unknown_steps_instead_of_stale(user_dir, capsys):
    code, out, _ = cli(
        ["status", *PIPE, "--features-dir", "features", "--model-dir", "modles"],
        capsys,
    )
    assert code == 0
    for step in ("scale", "pca", "scores"):
        row = next(line for line in out.splitlines() if f"│ {step} " in line)
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[1:4] == ["missing", "?", "?"]  # valid and stale unknown
    assert "unknown (no model at modles/scale.pkl)" in " ".join(out.split())


def test_status_shows_unknown_and_writing_files(user_dir, capsys):
    folder = user_dir / "features" / "scale" / "scan"
    (folder / "900.h5").write_bytes(b"garbage")  # corrupt
    with h5py.File(folder / "901.h5", "w") as f:  # readable, not samplepipe's
        f["x"] = np.zeros(3)
    live = f".902.h5.{HOST_TAG}-{os.getpid()}-abcdef12.tmp"
    (folder / live).write_bytes(b"partial")  # a live writer: this process
    dead = f".903.h5.{HOST_TAG}-{dead_pid()}-abcdef12.tmp"
    (folder / dead).write_bytes(b"partial")  # a crashed writer
    code, out, err = cli(["status", *PIPE, *DIRS], capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if "┃ step " in line)
    assert [c.strip() for c in header.split("┃") if c.strip()] == [
        "step",
        "model",
        "valid",
        "stale",
        "corrupt",
        "foreign",
        "unknown",
        "temporary",
        "writing",
        "bytes",
    ]
    row = next(line for line in out.splitlines() if "│ scale " in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[2:9] == [str(len(KEYS)), "0", "1", "0", "1", "1", "1"]
    code, out, _ = cli(["clean", *PIPE, *DIRS, "--yes"], capsys)
    assert code == 0
    assert (folder / "901.h5").exists() and (folder / live).exists()
    assert not (folder / "900.h5").exists() and not (folder / dead).exists()


def test_clean_keeps_a_file_that_changed_after_it_was_listed(
    user_dir, capsys, monkeypatch
):
    changed = user_dir / "features" / "pca" / "scan" / "001.h5"
    corrupt = user_dir / "features" / "scale" / "scan" / "002.h5"
    good = changed.read_bytes()
    changed.write_bytes(b"garbage")
    corrupt.write_bytes(b"garbage")

    def answer(prompt):
        # While the user reads the list, a job writes a valid checkpoint.
        tmp = changed.with_name(".repaired.tmp")
        tmp.write_bytes(good)
        os.replace(tmp, changed)
        return "y"

    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr("builtins.input", answer)
    code, out, err = cli(["clean", *PIPE, *DIRS], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "2 file(s)" in text and "Removed 1 file(s)." in text
    assert "kept features/pca/scan/001.h5: it changed since it was listed" in text
    assert changed.read_bytes() == good and not corrupt.exists()
    code, out, _ = cli(["status", *PIPE, *DIRS], capsys)
    row = next(line for line in out.splitlines() if "│ pca " in line)
    assert [c.strip() for c in row.split("│") if c.strip()][2:5] == ["29", "0", "0"]


# -- 3. user-controlled strings are printed verbatim, never as markup --------
def test_clean_prints_keys_with_markup_verbatim(user_dir, capsys):
    import userpipe

    build(userpipe.make_pipeline(), "marked", "marked-models", samples(MARKED_KEYS))
    features = user_dir / "marked"
    left = features / "pca" / "scan[left]" / "001.h5"
    close = features / "pca" / "scan[/]" / "002.h5"
    for path in (left, close):
        path.write_bytes(b"garbage")
    argv = ["clean", *PIPE, "--features-dir", "marked", "--model-dir", "marked-models"]
    code, out, err = cli([*argv, "--dry-run"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.endswith("  marked/pca/scan[left]/001.h5") for line in lines)
    assert any(line.endswith("  marked/pca/scan[/]/002.h5") for line in lines)
    assert "2 file(s)" in out and left.exists() and close.exists()
    code, out, err = cli([*argv, "--yes"], capsys)
    assert code == 0, err
    assert not left.exists() and not close.exists()
    assert len(snapshot(features)) == 3 * len(MARKED_KEYS) - 2


def test_status_prints_names_with_markup_verbatim(user_dir, capsys):
    argv = ["status", "userpipe:odd_names", "--features-dir", "f[/]x[bold]"]
    code, out, err = cli([*argv, "--model-dir", "m"], capsys)
    assert code == 0, err
    assert "checkpoints in f[/]x[bold]" in out
    assert "│ a[red]b " in out and "│ c[bold]d " in out


def test_run_prints_errors_with_markup_verbatim(tmp_path, prefect_server):
    # the session's server: what is tested here does not depend on the server
    env = command_env(tmp_path, prefect_server["PREFECT_API_URL"])
    result = samplepipe("run", "no.such[/]module:pipe", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "MarkupError" not in result.stderr
    assert "cannot import module 'no.such[/]module'" in " ".join(result.stderr.split())


# -- 4. files that vanish during the scan ------------------------------------
def _churn(folders, stop, counts):
    """Write like a job: temporary files renamed into place, or removed."""
    host = socket.gethostname()
    i = 0
    while not stop.is_set():
        folder = folders[i % len(folders)]
        name = f"zz{i % 7:03d}.h5"
        tmp = folder / f".{name}.{host}-1-{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(b"partial")
        if i % 3 == 0:
            tmp.unlink()  # a failed write cleans up
        else:
            os.replace(tmp, folder / name)
        if i % 5 == 0:
            (folder / name).unlink(missing_ok=True)  # e.g. another clean
        counts[0] += 1
        i += 1


def test_status_and_clean_tolerate_files_vanishing_during_the_scan(user_dir, capsys):
    features = user_dir / "features"
    folders = [features / step / "scan" for step in ("scale", "pca", "scores")]
    stop, counts = threading.Event(), [0]
    thread = threading.Thread(target=_churn, args=(folders, stop, counts))
    thread.start()
    try:
        codes = [cli(["status", *PIPE, *DIRS], capsys)[0] for _ in range(50)]
        codes += [cli(["clean", *PIPE, *DIRS, "--dry-run"], capsys)[0]]
    finally:
        stop.set()
        thread.join()
    assert counts[0] > 100  # the writer really ran during the scans
    assert codes == [0] * 51


# -- 5. the current folder is importable, and python -m samplepipe works -----
@pytest.mark.parametrize("command", [SCRIPT, PYTHON_M], ids=["script", "python-m"])
def test_cli_imports_a_module_from_the_current_folder(user_dir, command):
    env = command_env(user_dir)

    def run(*args):
        return samplepipe(*args, cwd=user_dir, env=env, command=command)

    status = run("status", *PIPE, *DIRS)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if "│ pca " in line)
    assert [c.strip() for c in row.split("│") if c.strip()][2:4] == ["29", "0"]
    clean = run("clean", *PIPE, *DIRS, "--dry-run")
    assert clean.returncode == 0 and "0 file(s)" in clean.stdout, clean.stderr
    usage = run("--help")
    assert usage.returncode == 0 and "Usage: samplepipe" in usage.stdout


def test_run_imports_a_module_from_the_current_folder(user_dir, prefect_server):
    # the session's server: what is tested here does not depend on the server
    result = samplepipe(
        "run",
        *PIPE,
        "--features-dir",
        "out/features",
        "--model-dir",
        "out/models",
        *random_samples_options(20, 10, seed=1, prefix="t"),
        cwd=user_dir,
        env=command_env(user_dir, prefect_server["PREFECT_API_URL"]),
        command=PYTHON_M,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(user_dir / "out" / "models")) == [
        "pca.pkl",
        "scale.pkl",
        "scores.pkl",
    ]


# -- bad run options: refused before any server, folder or deployment ---------
@pytest.mark.parametrize("command", ["run", "serve"])
@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--method", "bogus", "method='bogus'"),
        ("--on-error", "nope", "on_error='nope'"),
        ("--max-batches-in-flight", "0", "max_batches_in_flight"),
    ],
)
def test_bad_run_options_fail_the_command_before_it_starts(
    tmp_path, monkeypatch, capsys, command, option, value, named
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    folders = DIRS if command == "serve" else []  # run: the demo's own folders
    code, out, err = cli([command, *folders, option, value], capsys)
    assert code == 2
    assert f"samplepipe {command}:" in err and named in err
    assert sorted(os.listdir(tmp_path)) == []  # no folder made, no server state


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--anchor-date", "2026-12-05T02:00:00+00:00"], "needs --interval"),
        (["--interval", "60", "--anchor-date", "tomorrow"], "'tomorrow' is not"),
        (
            ["--interval", "60", "--anchor-date", "2026-12-05T02:00:00"],
            "with a time zone",
        ),
    ],
    ids=["no-interval", "not-a-date", "no-time-zone"],
)
def test_bad_anchor_date_fails_serve_before_it_starts(
    tmp_path, monkeypatch, capsys, options, named
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, out, err = cli(["serve", *DIRS, *options], capsys)
    assert code == 2
    assert "samplepipe serve: --anchor-date" in err and named in " ".join(err.split())
    assert sorted(os.listdir(tmp_path)) == []  # no folder made, no server state


def test_anchor_date_starts_the_interval_schedule():
    from datetime import datetime, timedelta, timezone

    from samplepipe.cli import _schedule

    assert _schedule(None, 60.0, None) == {"interval": 60.0}
    assert _schedule("0 2 * * *", None, None) == {"cron": "0 2 * * *"}
    (interval,) = _schedule(None, 90.0, "2026-12-05T02:00:00+01:00")["schedules"]
    assert interval.interval == timedelta(seconds=90)
    assert interval.anchor_date == datetime(2026, 12, 5, 1, tzinfo=timezone.utc)
