"""Every way a step's code can reach other code, and an edit there recomputes.

Each row of ``WAYS`` is a small tree of user modules written to disk and
imported for real: ``steps.py`` defines ``Dependent``, whose ``transform``
reaches the edited code in the way the row names, and ``Independent``, which
does not. The test runs both steps, edits one file (``2.0`` becomes ``3.0``),
imports the tree again as a new process would (the module path is not part of
the identity) and checks that exactly the dependent step's samples recompute,
with the new values, and the independent step's are reused.

The same test then runs against a deliberately narrowed hasher, one that does
not follow the way of the row (``_Hasher.FOLLOW`` less ``ROW.follows``): the
edit goes unseen and the stale result comes back, so the test can fail.

| way code reaches code | row |
| --- | --- |
| a function imported by name (``from helpers import scale``) | global-function |
| an attribute of a user module (``helpers.scale``) | module-attribute |
| a chained attribute of a package (``pkg.sub.scale``) | package-chain |
| a submodule imported by name (``from pkg import sub; sub.scale``) | submodule |
| a function called by a reached function, two modules away | two-hops |
| a module's attribute inside a comprehension or lambda (nested code) | nested-code |
| a dict of functions held as a global (``TABLE["f"]``) | dict-of-functions |
| a tuple of functions held as a global | tuple-of-functions |
| ``getattr(module, name)``: the whole module | getattr-module |
| ``importlib.import_module("helpers")``: the whole module | importlib |
| ``import helpers`` inside the function | import-in-function |
| ``from . import sub`` inside a package's function | relative-import |
| a ``functools.singledispatch`` implementation | singledispatch |
| a ``functools.singledispatchmethod`` implementation | singledispatchmethod |
| a decorator with ``functools.wraps`` (``__wrapped__`` and closure) | wraps-decorator |
| a decorator without ``functools.wraps`` (closure only) | closure-decorator |
| a callable class instance as decorator (``@Memo``) | instance-decorator |
| a bound method held as a global (``SCALE = Scaler().apply``) | bound-method |
| an instance of a user class held as a global (its code) | instance-code |
| an instance of a user class held as a global (its state) | instance-state |
| a base class in another module | base-class |
| a class attribute holding a function of another module | class-attribute |
| a class attribute holding a module (``ops = helpers``) | class-module |
| a default argument (``def transform(self, X, op=helpers.scale)``) | default-argument |
| a ``functools.partial`` parameter of ``FunctionTransformer`` | partial-parameter |
| a module passed as a parameter (``Dependent(ops=helpers)``) | module-parameter |
| a ``functools.lru_cache`` function held as a global | lru-cache-global |
| a library object around a user function (``np.vectorize``) | vectorize-global |
| a set held as a global | set-global |
| a ``dict`` subclass held as a global | dict-subclass-global |
| an ``OrderedDict`` of functions | ordered-dict-table |
| a ``namedtuple`` of functions | namedtuple-table |
| a ``functools.partialmethod`` and its arguments | partialmethod |
| a method of the class's metaclass | metaclass |
| ``sys.modules["helpers"]`` | sys-modules |
| ``globals()[name]`` | globals-lookup |
| ``helpers.__dict__[name]`` | module-dict |
| an attribute set on a function (``scale.factor = 2.0``) | function-attribute |
| a user descriptor's own state | descriptor-state |
| functions a module's ``__getattr__`` makes on each access | module-getattr-factory |
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from samplepipe import CheckpointWarning, Sample, wrap
from samplepipe.storage import TransformReport, identity

STATELESS = """
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


class Stateless(TransformerMixin, BaseEstimator):
    def fit(self, X, y=None):
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


class Independent(Stateless):
    def transform(self, X):
        return np.asarray(X) + 1.0
"""

HELPERS = """
import numpy as np


def scale(X):
    return np.asarray(X) * 2.0


def shift(X):
    return np.asarray(X) + 1.0
"""


@dataclass(frozen=True)
class Way:
    """One way code reaches code: the files, the edit, what follows it."""

    name: str
    steps: str
    follows: frozenset[str]
    files: dict[str, str] = field(default_factory=dict)
    edit: str = "helpers.py"
    parameters: str = ""  # Python expression for Dependent's arguments

    def tree(self) -> dict[str, str]:
        files = {"helpers.py": HELPERS, **self.files}
        files["steps.py"] = STATELESS + textwrap.dedent(self.steps)
        return files


def way(name, steps, follows, **kwargs):
    return pytest.param(
        Way(name, steps, frozenset(follows.split(",")), **kwargs), id=name
    )


PKG = {
    "pkg/__init__.py": "",
    "pkg/sub.py": HELPERS,
}

WAYS = [
    way(
        "global-function",
        """
        from helpers import scale

        class Dependent(Stateless):
            def transform(self, X):
                return scale(X)
        """,
        "globals",
    ),
    way(
        "module-attribute",
        """
        import helpers

        class Dependent(Stateless):
            def transform(self, X):
                return helpers.scale(X)

        class Independent(Stateless):
            def transform(self, X):
                return helpers.shift(X)
        """,
        "module attributes",
    ),
    way(
        "package-chain",
        """
        import pkg.sub

        class Dependent(Stateless):
            def transform(self, X):
                return pkg.sub.scale(X)
        """,
        "module attributes",
        files=PKG,
        edit="pkg/sub.py",
    ),
    way(
        "submodule",
        """
        from pkg import sub

        class Dependent(Stateless):
            def transform(self, X):
                return sub.scale(X)

        class Independent(Stateless):
            def transform(self, X):
                return sub.shift(X)
        """,
        "module attributes",
        files=PKG,
        edit="pkg/sub.py",
    ),
    way(
        "two-hops",
        """
        import middle

        class Dependent(Stateless):
            def transform(self, X):
                return middle.twice(X)
        """,
        "module attributes",
        files={
            "middle.py": (
                "import helpers\n\n\ndef twice(X):\n    return helpers.scale(X)\n"
            )
        },
    ),
    way(
        "nested-code",
        """
        import helpers

        class Dependent(Stateless):
            def transform(self, X):
                return np.stack([helpers.scale(x) for x in X])
        """,
        "module attributes",
    ),
    way(
        "dict-of-functions",
        """
        from pkg import sub

        TABLE = {"f": sub.scale, "g": sub.shift}

        class Dependent(Stateless):
            def transform(self, X):
                return TABLE["f"](X)
        """,
        "containers",
        files=PKG,
        edit="pkg/sub.py",
    ),
    way(
        "tuple-of-functions",
        """
        import helpers

        CHAIN = (helpers.scale,)

        class Dependent(Stateless):
            def transform(self, X):
                for f in CHAIN:
                    X = f(X)
                return X
        """,
        "containers",
    ),
    way(
        "getattr-module",
        """
        import helpers

        class Dependent(Stateless):
            def __init__(self, op="scale"):
                self.op = op

            def transform(self, X):
                return getattr(helpers, self.op)(X)
        """,
        "whole modules",
    ),
    way(
        "importlib",
        """
        import importlib

        class Dependent(Stateless):
            def transform(self, X):
                return importlib.import_module("helpers").scale(X)
        """,
        "imports",
    ),
    way(
        "import-in-function",
        """
        class Dependent(Stateless):
            def transform(self, X):
                import helpers

                return helpers.scale(X)
        """,
        "imports",
    ),
    way(
        "relative-import",
        """
        from pkg.steps import Dependent
        """,
        "imports",
        files={
            **PKG,
            "pkg/steps.py": STATELESS
            + textwrap.dedent(
                """
                class Dependent(Stateless):
                    def transform(self, X):
                        from . import sub

                        return sub.scale(X)
                """
            ),
        },
        edit="pkg/sub.py",
    ),
    way(
        "singledispatch",
        """
        import functools

        @functools.singledispatch
        def convert(X):
            raise TypeError(type(X))

        @convert.register(np.ndarray)
        def _(X):
            return X * 2.0

        class Dependent(Stateless):
            def transform(self, X):
                return convert(np.asarray(X))
        """,
        "registries",
        edit="steps.py",
    ),
    way(
        "singledispatchmethod",
        """
        import functools

        class Dependent(Stateless):
            @functools.singledispatchmethod
            def convert(self, X):
                raise TypeError(type(X))

            @convert.register
            def _(self, X: np.ndarray):
                return X * 2.0

            del _  # reached through the registry only

            def transform(self, X):
                return self.convert(np.asarray(X))
        """,
        "registries",
        edit="steps.py",
    ),
    way(
        "wraps-decorator",
        """
        import decorators
        import helpers

        class Dependent(Stateless):
            @decorators.logged
            def transform(self, X):
                return helpers.shift(X) - 1.0
        """,
        "wrapped,closures",
        files={
            "decorators.py": """
import functools


def logged(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs) * 2.0

    return wrapper
"""
        },
        edit="decorators.py",
    ),
    way(
        "closure-decorator",
        """
        import helpers

        def using(op):
            def decorate(f):
                def wrapper(self, X):
                    return op(f(self, X))

                return wrapper

            return decorate

        class Dependent(Stateless):
            @using(helpers.scale)
            def transform(self, X):
                return np.asarray(X)
        """,
        "closures",
    ),
    way(
        "instance-decorator",
        """
        import helpers

        class Applied:
            def __init__(self, f):
                self.f = f

            def __call__(self, X):
                return helpers.scale(self.f(X))

        @Applied
        def identity(X):
            return np.asarray(X)

        class Dependent(Stateless):
            def transform(self, X):
                return identity(X)
        """,
        "instances",
    ),
    way(
        "bound-method",
        """
        class Scaler:
            def apply(self, X):
                return np.asarray(X) * 2.0

        SCALE = Scaler().apply

        class Dependent(Stateless):
            def transform(self, X):
                return SCALE(X)
        """,
        "bound methods",
        edit="steps.py",
    ),
    way(
        "instance-code",
        """
        import scalers

        SCALER = scalers.Scaler()

        class Dependent(Stateless):
            def transform(self, X):
                return SCALER.apply(X)
        """,
        "instances",
        files={
            "scalers.py": """
import numpy as np


class Scaler:
    def apply(self, X):
        return np.asarray(X) * 2.0
"""
        },
        edit="scalers.py",
    ),
    way(
        "instance-state",
        """
        import scalers

        SCALER = scalers.Scaler(2.0)

        class Dependent(Stateless):
            def transform(self, X):
                return SCALER.apply(X)
        """,
        "instances",
        files={
            "scalers.py": """
import numpy as np


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, X):
        return np.asarray(X) * self.factor
"""
        },
        edit="steps.py",
    ),
    way(
        "base-class",
        """
        import bases

        class Dependent(bases.Scaling):
            pass
        """,
        "bases",
        files={
            "bases.py": STATELESS
            + """

class Scaling(Stateless):
    def transform(self, X):
        return np.asarray(X) * 2.0
"""
        },
        edit="bases.py",
    ),
    way(
        "class-attribute",
        """
        import helpers

        class Dependent(Stateless):
            op = staticmethod(helpers.scale)

            def transform(self, X):
                return self.op(X)
        """,
        "class attributes",
    ),
    way(
        "class-module",
        """
        import helpers

        class Dependent(Stateless):
            ops = helpers

            def transform(self, X):
                return self.ops.scale(X)
        """,
        "class attributes,whole modules",
    ),
    way(
        "default-argument",
        """
        import helpers

        class Dependent(Stateless):
            def transform(self, X, op=helpers.scale):
                return op(X)
        """,
        "defaults",
    ),
    way(
        "partial-parameter",
        """
        import functools
        import helpers
        from sklearn.preprocessing import FunctionTransformer

        def Dependent():
            return FunctionTransformer(functools.partial(helpers.scale))
        """,
        "partials",
    ),
    way(
        "module-parameter",
        """
        class Dependent(Stateless):
            def __init__(self, ops=None):
                self.ops = ops

            def transform(self, X):
                return self.ops.scale(X)
        """,
        "whole modules",
        parameters="importlib.import_module('helpers')",
    ),
    way(
        "lru-cache-global",
        """
        from factors import factor

        class Dependent(Stateless):
            def transform(self, X):
                return np.asarray(X) * factor()
        """,
        "wrapped",
        files={
            "factors.py": (
                "import functools\n\n\n@functools.lru_cache(maxsize=None)\n"
                "def factor():\n    return 2.0\n"
            )
        },
        edit="factors.py",
    ),
    way(
        "vectorize-global",
        """
        import helpers

        SCALE = np.vectorize(helpers.scale)

        class Dependent(Stateless):
            def transform(self, X):
                return SCALE(X)
        """,
        "wrapped",
    ),
    way(
        "set-global",
        """
        FACTORS = {2.0}

        class Dependent(Stateless):
            def transform(self, X):
                return np.asarray(X) * max(FACTORS)
        """,
        "globals",
        edit="steps.py",
    ),
    way(
        "dict-subclass-global",
        """
        class Config(dict):
            pass

        CONFIG = Config(factor=2.0)

        class Dependent(Stateless):
            def transform(self, X):
                return np.asarray(X) * CONFIG["factor"]
        """,
        "globals",
        edit="steps.py",
    ),
    way(
        "ordered-dict-table",
        """
        import collections
        import helpers

        TABLE = collections.OrderedDict(scale=helpers.scale)

        class Dependent(Stateless):
            def transform(self, X):
                return TABLE["scale"](X)
        """,
        "containers",
    ),
    way(
        "namedtuple-table",
        """
        import collections
        import helpers

        Ops = collections.namedtuple("Ops", "scale")
        OPS = Ops(helpers.scale)

        class Dependent(Stateless):
            def transform(self, X):
                return OPS.scale(X)
        """,
        "containers,instances",
    ),
    way(
        "partialmethod",
        """
        import functools

        class Dependent(Stateless):
            def _times(self, X, k):
                return np.asarray(X) * k

            times = functools.partialmethod(_times, k=2.0)

            def transform(self, X):
                return self.times(X)
        """,
        "partials",
        edit="steps.py",
    ),
    way(
        "metaclass",
        """
        import metas

        class Dependent(Stateless, metaclass=metas.Meta):
            def transform(self, X):
                return np.asarray(X) * type(self).factor()
        """,
        "bases",
        files={
            "metas.py": (
                "import abc\n\n\nclass Meta(abc.ABCMeta):\n"
                "    def factor(cls):\n        return 2.0\n"
            )
        },
        edit="metas.py",
    ),
    way(
        "sys-modules",
        """
        import sys

        import helpers  # noqa: F401 - loaded, then found by name

        class Dependent(Stateless):
            def transform(self, X):
                return sys.modules["helpers"].scale(X)
        """,
        "imports",
    ),
    way(
        "globals-lookup",
        """
        from helpers import scale  # noqa: F401 - found through globals()

        class Dependent(Stateless):
            def __init__(self, op="scale"):
                self.op = op

            def transform(self, X):
                return globals()[self.op](X)
        """,
        "whole modules",
    ),
    way(
        "module-dict",
        """
        import helpers

        class Dependent(Stateless):
            def transform(self, X):
                return helpers.__dict__["scale"](X)
        """,
        "whole modules",
    ),
    way(
        "function-attribute",
        """
        def scale(X):
            return np.asarray(X) * scale.factor

        scale.factor = 2.0

        class Dependent(Stateless):
            def transform(self, X):
                return scale(X)
        """,
        "function attributes",
        edit="steps.py",
    ),
    way(
        "descriptor-state",
        """
        class Scaled:
            def __init__(self, func, factor):
                self.func, self.factor = func, factor

            def __get__(self, obj, objtype=None):
                return lambda X: self.func(X) * self.factor

        class Dependent(Stateless):
            apply = Scaled(np.asarray, 2.0)

            def transform(self, X):
                return self.apply(X)
        """,
        "instances",
        edit="steps.py",
    ),
    way(
        "module-getattr-factory",
        """
        import factory

        class Dependent(Stateless):
            def transform(self, X):
                return factory.double(X) * 0.0 + factory.triple(X)
        """,
        "module attributes",
        files={
            "factory.py": (
                "import numpy as np\n\nFACTORS = {'double': 1.5, 'triple': 2.0}\n\n\n"
                "def __getattr__(name):\n"
                "    factor = FACTORS[name]\n"
                "    return lambda X: np.asarray(X) * factor\n"
            )
        },
        edit="factory.py",
    ),
]


class UserCode:
    """A tree of user modules on disk, imported afresh as a new process would."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        monkeypatch.syspath_prepend(str(root))
        # an edit that keeps a file's size within one second would load stale .pyc
        monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def write(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def forget(self) -> None:
        """Drop every module of the tree from ``sys.modules``."""
        root = str(self.root)
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(root):
                del sys.modules[name]
        importlib.invalidate_caches()

    def load(self, name: str):
        self.forget()
        return importlib.import_module(name)


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    code = UserCode(tmp_path / "code", monkeypatch)
    yield code
    code.forget()


def run(steps, name, features_dir, parameters):
    factory = getattr(steps, name)
    if parameters:
        estimator = factory(eval(parameters, {"importlib": importlib}))
    else:
        estimator = factory()
    step = wrap(["sample", "checkpoint"], estimator, features_dir=str(features_dir))
    samples = [Sample(np.full(3, float(i)), key=f"k{i}") for i in range(4)]
    report = TransformReport()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        outputs = step.transform_samples(samples, report)
    said = [str(w.message) for w in caught if w.category is CheckpointWarning]
    return report.computed, np.stack([s.data for s in outputs]), said


def edit_and_rerun(user_code, tmp_path, case):
    """First run, the edit, a fresh import and a second run of both steps."""
    user_code.write(case.tree())
    dirs = {n: tmp_path / n for n in ("Dependent", "Independent")}
    args = {"Dependent": case.parameters, "Independent": ""}
    steps = user_code.load("steps")
    first = {n: run(steps, n, d, args[n]) for n, d in dirs.items()}
    path = user_code.root / case.edit
    text = path.read_text()
    assert text.count("2.0") == 1, "each row edits one factor"
    path.write_text(text.replace("2.0", "3.0"))
    steps = user_code.load("steps")
    second = {n: run(steps, n, d, args[n]) for n, d in dirs.items()}
    return first, second


@pytest.mark.parametrize("case", WAYS)
def test_an_edit_of_reached_code_recomputes_exactly_the_dependent_step(
    user_code, tmp_path, case
):
    first, second = edit_and_rerun(user_code, tmp_path, case)
    X = np.stack([np.full(3, float(i)) for i in range(4)])
    assert first["Dependent"][0] == 4
    np.testing.assert_array_equal(first["Dependent"][1], X * 2.0)
    assert first["Independent"][0] == 4
    # the edit: every sample of the dependent step recomputes, with the new code
    assert second["Dependent"][0] == 4
    np.testing.assert_array_equal(second["Dependent"][1], X * 3.0)
    assert len(second["Dependent"][2]) == 1
    assert "recomputes 4 checkpoint(s)" in second["Dependent"][2][0]
    assert "4 stale" in second["Dependent"][2][0]
    # and nothing of the step that does not reach the edited code
    assert second["Independent"][0] == 0
    np.testing.assert_array_equal(second["Independent"][1], X + 1.0)
    assert second["Independent"][2] == []


@pytest.mark.parametrize("case", WAYS)
def test_a_hasher_that_does_not_follow_the_way_returns_the_stale_result(
    user_code, tmp_path, case, monkeypatch
):
    assert case.follows <= identity._Hasher.FOLLOW
    monkeypatch.setattr(
        identity._Hasher, "FOLLOW", identity._Hasher.FOLLOW - case.follows
    )
    first, second = edit_and_rerun(user_code, tmp_path, case)
    X = np.stack([np.full(3, float(i)) for i in range(4)])
    # what the test above would catch: nothing recomputed, the old values back
    assert second["Dependent"][0] == 0
    np.testing.assert_array_equal(second["Dependent"][1], X * 2.0)
    assert second["Dependent"][2] == []


def test_the_table_lists_every_row_and_every_way_is_followed():
    rows = {p.values[0].name for p in WAYS}
    for name in rows:
        assert f"| {name} |" in __doc__
    assert len(rows) == len(WAYS) >= 12
    followed = frozenset().union(*(p.values[0].follows for p in WAYS))
    assert followed == identity._Hasher.FOLLOW


def test_the_issue_reproduction_as_a_user_runs_it(tmp_path):
    """``python run.py`` twice in new processes, ``helpers.py`` edited between."""
    files = {
        "helpers.py": HELPERS,
        "step.py": STATELESS
        + "\nimport helpers\n\n\nclass ByModule(Stateless):\n"
        + "    def transform(self, X):\n        return helpers.scale(X)\n",
        "run.py": (
            "import numpy as np, samplepipe as sp, step\n"
            's = [sp.Sample(np.ones(2) * i, key=f"k{i}") for i in range(3)]\n'
            'w = sp.wrap(["sample", "checkpoint"], step.ByModule(), features_dir="f")\n'
            "print(w.transform(s)[1].data)\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    def run_py():
        return subprocess.run(
            [sys.executable, "-W", "ignore", "run.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        ).stdout.strip()

    assert run_py() == "[2. 2.]"
    helpers = tmp_path / "helpers.py"
    helpers.write_text(HELPERS.replace("2.0", "3.0"))
    assert run_py() == "[3. 3.]"


def test_an_identity_does_not_depend_on_what_was_imported_before(user_code):
    """Hashing imports nothing, and a package's submodules count by their source.

    An identity that imported the modules a function imports changed what
    their package held (its submodule as an attribute): the same step had
    another identity the second time (a served deployment refused its own
    models as "fitted after other versions of the steps before it").
    """
    user_code.write(
        {
            **PKG,
            "lazy.py": (
                "import pkg\n\n\n"
                "def by_name(X, name='scale'):\n    return getattr(pkg, name)(X)\n\n\n"
                "def late(X):\n    from pkg import sub\n\n    return sub.scale(X)\n"
            ),
        }
    )
    lazy = user_code.load("lazy")
    whole, late = (
        identity.code_identity(lazy.by_name),
        identity.code_identity(lazy.late),
    )
    assert "pkg.sub" not in sys.modules  # hashing `late` imported nothing
    importlib.import_module("pkg.sub")  # as running `late` does
    assert identity.code_identity(lazy.by_name) == whole
    assert identity.code_identity(lazy.late) == late
    (user_code.root / "pkg" / "sub.py").write_text(HELPERS.replace("2.0", "3.0"))
    user_code.forget()
    lazy = user_code.load("lazy")
    assert identity.code_identity(lazy.late) != late
    assert identity.code_identity(lazy.by_name) != whole  # its submodule's source
