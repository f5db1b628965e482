"""A code identity survives a Python upgrade (issue 24, item 3).

The same pipeline runs against one folder under this interpreter and under
another minor version (3.13, or 3.11 when this is 3.13), each with the same
versions of numpy and scikit-learn: the second computes nothing. An edit of
the user's code is still seen under the other version, and a comment or a
docstring is not.

The other interpreter gets a virtual environment of its own the first time
(``.venvs/`` in the checkout, about 40 s from pip's cache). Without such an
interpreter the test is skipped, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from samplepipe.storage import code_identity
from samplepipe.storage.source import source_digest

ROOT = Path(__file__).resolve().parents[1]
OTHER = "3.13" if sys.version_info[:2] != (3, 13) else "3.11"
# what the identity or the checkpoints depend on, at the versions running here
PINNED = ("numpy", "scikit-learn", "h5py", "joblib", "cloudpickle", "rich")

pytestmark = pytest.mark.slow

FEATURES = '''
"""A user's own module, as on disk beside a script."""

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

import helpers


class Center(TransformerMixin, BaseEstimator):
    """Centres on the training mean, then scales."""

    def __init__(self, factor=2.0, log_path=None):
        self.factor = factor
        self.log_path = log_path

    def fit(self, X, y=None):
        self.mean_ = np.mean(X, axis=0)
        return self

    def transform(self, X):
        with open(self.log_path, "a") as f:
            f.write(f"center {len(X)}\\n")
        rows = [helpers.scale(x, self.factor) for x in np.asarray(X)]
        return np.stack(rows) - self.mean_


def double(X):
    return np.asarray(X) * 2.0
'''

HELPERS = """
def scale(x, factor):
    return x * factor
"""

RUN = """
import sys

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

import samplepipe as sp
import features

root = sys.argv[1]
samples = [sp.Sample(np.arange(3.0) + i, key=f"s{i}") for i in range(6)]
pipeline = Pipeline(
    [
        ("center", features.Center(log_path=root + "/calls.log")),
        ("double", FunctionTransformer(features.double)),
        ("negate", FunctionTransformer(lambda X: -np.asarray(X))),
    ]
)
model = sp.wrap(
    ["sample", "checkpoint"],
    pipeline,
    features_dir=root + "/features",
    model_path=root + "/models",
)
out = model.fit(samples).transform(samples)
np.save(root + "/out.npy", np.stack([s.data for s in out]))
"""


def _other_interpreter() -> str | None:
    found = shutil.which(f"python{OTHER}")
    if found and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
        return found
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for candidate in sorted(glob.glob(f"{pyenv}/versions/{OTHER}.*/bin/python3")):
        return candidate
    return None


@pytest.fixture(scope="session")
def other_python() -> str:
    """A Python of another minor version with this checkout and the same libraries."""
    interpreter = _other_interpreter()
    if interpreter is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs Python {OTHER} (pyenv install {OTHER})")
        pytest.skip(f"no Python {OTHER} on this machine")
    pins = [f"{name}=={metadata.version(name)}" for name in PINNED]
    tag = "-".join(p.replace("==", "") for p in pins)
    venvs = ROOT / ".venvs"
    venvs.mkdir(exist_ok=True)
    target = venvs / f"python{OTHER}-{tag}"
    python = target / "bin" / "python"
    with open(venvs / ".lock", "w") as lock:  # one builder at a time (xdist)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not python.exists():
            build = Path(tempfile.mkdtemp(dir=venvs))
            subprocess.run([interpreter, "-m", "venv", str(build)], check=True)
            pip = [str(build / "bin" / "python"), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, *pins], check=True)
            subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
            build.rename(target)
    return str(python)


def run(python: str, code: Path, root: Path) -> tuple[int, np.ndarray, str]:
    """Runs the pipeline: the rows its user step computed, the outputs, stderr."""
    log = root / "calls.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(
        [python, "run.py", str(root)],
        cwd=code,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    lines = log.read_text().splitlines() if log.exists() else []
    rows = sum(int(line.split()[1]) for line in lines)
    return rows, np.load(root / "out.npy"), done.stderr


@pytest.fixture
def user_code(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "features.py").write_text(FEATURES)
    (code / "helpers.py").write_text(HELPERS)
    (code / "run.py").write_text(RUN)
    return code


def test_another_python_version_reuses_every_checkpoint(
    other_python, user_code, tmp_path
):
    root = tmp_path / "run"
    root.mkdir()
    X = np.stack([np.arange(3.0) + i for i in range(6)])
    rows, first, said = run(sys.executable, user_code, root)
    assert rows == 6
    np.testing.assert_allclose(first, -2 * (X * 2.0 - X.mean(axis=0)))
    assert said == ""
    files = sorted(p.name for p in (root / "features").rglob("*.h5"))
    assert len(files) == 18  # three steps, six samples

    # the other interpreter computes nothing: every checkpoint and model fits
    rows, second, said = run(other_python, user_code, root)
    assert (rows, said) == (0, "")
    np.testing.assert_array_equal(second, first)

    # a comment and a docstring are not a change
    features = user_code / "features.py"
    features.write_text(
        FEATURES.replace(
            '"""Centres on the training mean, then scales."""', ""
        ).replace("def double(X):", "def double(X):  # twice\n    # as before")
    )
    rows, third, said = run(other_python, user_code, root)
    assert (rows, said) == (0, "")
    np.testing.assert_array_equal(third, first)

    # an edit of a helper the step reaches is seen, under either interpreter
    helpers = user_code / "helpers.py"
    helpers.write_text(HELPERS.replace("x * factor", "x * factor * 1.5"))
    rows, fourth, said = run(other_python, user_code, root)
    assert rows == 6  # refitted, and its checkpoints written once
    assert "CheckpointWarning" in said and "6 stale" in said
    np.testing.assert_allclose(fourth, -2 * (X * 2.0 * 1.5 - X.mean(axis=0)))
    rows, fifth, said = run(sys.executable, user_code, root)
    assert (rows, said) == (0, "")
    np.testing.assert_array_equal(fifth, fourth)


def test_the_source_digest_ignores_layout_and_sees_every_edit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    variants = {
        "base": "def f(x, k=2):\n    return x * k + 1\n",
        "comment": "def f(x, k=2):  # a comment\n    # another\n    return x * k + 1\n",
        "layout": "def f(x,\n      k=2):\n\n    return (x * k\n            + 1)\n",
        "docstring": 'def f(x, k=2):\n    """Doc."""\n    return x * k + 1\n',
        "moved": "\n\n\n# moved down\ndef f(x, k=2):\n    return x * k + 1\n",
        "operator": "def f(x, k=2):\n    return x * k - 1\n",
        "constant": "def f(x, k=2):\n    return x * k + 2\n",
        "argument": "def f(y, k=2):\n    return y * k + 1\n",
        "default": "def f(x, k=3):\n    return x * k + 1\n",
        "float": "def f(x, k=2):\n    return x * k + 1.0\n",
    }
    digests = {}
    for name, text in variants.items():
        module = f"variant_{name}"
        (tmp_path / f"{module}.py").write_text(text)
        f = __import__(module).f
        assert source_digest(f.__code__) is not None
        digests[name] = code_identity(f)
    same = {"base", "comment", "layout", "docstring", "moved"}
    assert len({digests[n] for n in same}) == 1
    changed = [digests[n] for n in variants if n not in same]
    assert len(set(changed)) == len(changed)
    assert digests["base"] not in changed


def test_code_edited_after_its_import_falls_back_to_the_bytecode(tmp_path, monkeypatch):
    """The source on disk is trusted only when it compiles to the code that runs."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    path = tmp_path / "edited_after_import.py"
    path.write_text("def f(x):\n    return x * 2\n")
    from edited_after_import import f  # noqa: PLC0415

    path.write_text("def f(x):\n    return x * 3\n")
    os.utime(path, ns=(1, 1))  # a new stamp, whatever the clock's resolution
    assert source_digest(f.__code__) is None
    # the identity of the running code (its bytecode), not of the new source
    (tmp_path / "edited_copy.py").write_text(path.read_text())
    from edited_copy import f as edited  # noqa: PLC0415

    assert source_digest(edited.__code__) is not None
    assert code_identity(edited) != code_identity(f)
    lambdas = textwrap.dedent(
        """
        PAIR = (lambda X: X + 1, lambda X: X + 100)
        """
    )
    (tmp_path / "two_lambdas.py").write_text(lambdas)
    from two_lambdas import PAIR  # noqa: PLC0415

    first, second = (source_digest(f.__code__) for f in PAIR)
    assert first is not None and second is not None and first != second
