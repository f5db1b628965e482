"""Every public function and method is annotated: each parameter and the return.

The public API is every name in ``samplepipe.__all__`` (for a class: its public
methods, properties and ``__init__``, including those it inherits from other
samplepipe classes), the module-level public functions, flows and tasks of
``samplepipe.flows``, ``samplepipe.tasks`` and ``samplepipe.cli`` (with the
commands it takes from ``samplepipe._cli_folders`` and ``samplepipe._cli_explain``),
and the public functions and classes of ``samplepipe.examples`` (deployments import
them by path).
Offenders are reported per module that defines them, so that a failure says
which file to fix.
"""

import importlib
import inspect
from typing import Any

import pytest
from sklearn.utils.metaestimators import available_if

import samplepipe

# Modules whose module-level public functions (including Prefect flows and tasks)
# count, and whether their public classes count too.
ENTRY_MODULES = {
    "samplepipe.flows": False,
    "samplepipe.tasks": False,
    "samplepipe.cli": False,
    "samplepipe._cli_folders": False,
    "samplepipe._cli_explain": False,
    "samplepipe.examples": True,
}


def _function(attr):
    """The plain function behind ``attr``, or None when it is not a function.

    Unwraps static and class methods, properties (their getter), Prefect flows
    and tasks and scikit-learn's ``available_if`` (both keep it in ``.fn``), and
    ``functools.wraps`` decorators.
    """
    if isinstance(attr, staticmethod | classmethod):
        attr = attr.__func__
    elif isinstance(attr, property):
        attr = attr.fget
    elif not inspect.isfunction(attr) and inspect.isfunction(getattr(attr, "fn", None)):
        attr = attr.fn
    if not inspect.isfunction(attr):
        return None
    return inspect.unwrap(attr)


def missing_annotations(func, *, method):
    """Names of the parameters of ``func`` without annotation, and ``"return"``.

    For a method (``method=True``) the first parameter (``self`` or ``cls``) is
    exempt.
    """
    signature = inspect.signature(func)
    annotations = func.__annotations__
    parameters = list(signature.parameters.values())
    if method:
        parameters = parameters[1:]
    missing = [
        p.name
        for p in parameters
        if p.name not in annotations or p.annotation is inspect.Parameter.empty
    ]
    if (
        "return" not in annotations
        or signature.return_annotation is inspect.Signature.empty
    ):
        missing.append("return")
    return missing


def _class_members(cls):
    """``(qualname, function, is_method)`` of the public methods of ``cls``.

    Methods inherited from samplepipe classes count; those of scikit-learn, Prefect
    or the standard library do not.
    """
    for klass in cls.__mro__:
        if not klass.__module__.startswith("samplepipe"):
            continue
        for name, attr in vars(klass).items():
            if name.startswith("_") and name != "__init__":
                continue
            func = _function(attr)
            if func is not None:
                method = not isinstance(attr, staticmethod)
                yield f"{klass.__qualname__}.{name}", func, method


def _members(objects, *, classes=True):
    """``{module: {qualname: missing}}`` over functions (and classes) in ``objects``."""
    found = {}
    for name, obj in objects:
        if isinstance(obj, type):
            if classes:
                members = list(_class_members(obj))
            else:
                members = []
        else:
            func = _function(obj)
            members = [] if func is None else [(name, func, False)]
        for qualname, func, method in members:
            found.setdefault(func.__module__, {})[qualname] = missing_annotations(
                func, method=method
            )
    return found


def _all_api():
    return _members((name, getattr(samplepipe, name)) for name in samplepipe.__all__)


def _entry_api(module_name):
    module = importlib.import_module(module_name)
    objects = [
        (name, obj)
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and getattr(_function(obj) or obj, "__module__", None) == module_name
    ]
    return _members(objects, classes=ENTRY_MODULES[module_name]).get(module_name, {})


ALL_MODULES = sorted(_all_api())


def _report(module_name, members):
    offenders = {q: m for q, m in members.items() if m}
    lines = [f"  {q}: {', '.join(m)}" for q, m in sorted(offenders.items())]
    return offenders, (
        f"{len(offenders)} public functions in {module_name} lack annotations "
        "(name: unannotated parameters or 'return'):\n" + "\n".join(lines)
    )


@pytest.mark.parametrize("module_name", ALL_MODULES)
def test_public_api_is_annotated(module_name):
    """Everything ``samplepipe.__all__`` reaches, per defining module."""
    members = _all_api()[module_name]
    offenders, msg = _report(module_name, members)
    assert not offenders, msg


@pytest.mark.parametrize("module_name", sorted(ENTRY_MODULES))
def test_entry_points_are_annotated(module_name):
    """Flows, tasks, the CLI and the examples."""
    members = _entry_api(module_name)
    assert members, f"found no public function in {module_name}; is the test stale?"
    offenders, msg = _report(module_name, members)
    assert not offenders, msg


def test_all_api_spans_the_wrapper_modules():
    # A change in how members are found must not empty the parametrization.
    assert {
        "samplepipe.wrappers._sample",
        "samplepipe.wrappers._sample_wrapper",
        "samplepipe.wrappers._dask",
        "samplepipe.wrappers._wrap",
        "samplepipe.wrappers._method",
    } <= set(ALL_MODULES)
    assert (
        "SampleWrapper.transform" in _all_api()["samplepipe.wrappers._sample_wrapper"]
    )


class _FakeTask:
    """Stands for a Prefect task or flow: the function is in ``.fn``."""

    def __init__(self, fn):
        self.fn = fn


def _unannotated_task(samples, batch_size: int = 10):
    return samples


def test_checker_catches_every_kind_of_gap():
    """A deliberately incomplete class and functions: the check lists each gap."""

    class Broken:
        def __init__(self, a: int):  # no '-> None'
            self.a = a

        def fit(self, X, y: Any = None) -> "Broken":
            return self

        @property
        def size(self):
            return 1

        @available_if(lambda self: True)
        def transform(self, X: Any, **kwargs) -> Any:
            return X

        @staticmethod
        def build(x: int):
            return x

        @classmethod
        def make(cls) -> "Broken":
            return cls(1)

        def _private(self, x):
            return x

    # Only classes of samplepipe count; their functions are grouped by module.
    Broken.__module__ = "samplepipe.fake"
    Broken.__qualname__ = "Broken"

    def helper(a, *args: int, **kwargs: Any) -> None:
        pass

    found = _members(
        [
            ("Broken", Broken),
            ("helper", helper),
            ("task", _FakeTask(_unannotated_task)),
        ]
    )
    assert found == {
        __name__: {
            "Broken.__init__": ["return"],
            "Broken.fit": ["X"],
            "Broken.size": ["return"],
            "Broken.transform": ["kwargs"],
            "Broken.build": ["return"],
            "Broken.make": [],
            "helper": ["a"],
            "task": ["samples", "return"],
        }
    }
