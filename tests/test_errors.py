"""Tests of samplepipe.errors: every exception and warning class lives there once."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import samplepipe
import samplepipe.errors

SRC = pathlib.Path(samplepipe.__file__).parent

# Where each class was defined before samplepipe.errors, and stays importable.
HOMES = {
    "ChangedWhileReading": ["samplepipe.storage.fs"],
    "CheckpointWarning": [
        "samplepipe",
        "samplepipe.wrappers",
        "samplepipe.wrappers._checkpoint",
    ],
    "ChecksumError": ["samplepipe.storage.hdf5"],
    "CommandError": ["samplepipe.cli"],
    "CorruptCheckpointError": [
        "samplepipe.storage",
        "samplepipe.storage.checkpoints",
    ],
    "LockTimeoutError": ["samplepipe.locks"],
    "LostLogsWarning": ["samplepipe.server"],
    "MissingStoreError": ["samplepipe.storage", "samplepipe.storage.files"],
    "ModelWarning": ["samplepipe.storage", "samplepipe.storage.models"],
    "PipelineRunError": ["samplepipe.flows"],
    "SampleFailures": ["samplepipe.tasks"],
    "SourceError": ["samplepipe.sources"],
    "ServerError": ["samplepipe.server"],
    "ShardError": ["samplepipe.storage.shards"],
    "StaleManifestError": ["samplepipe.tasks"],
    "UnknownFileError": ["samplepipe.storage", "samplepipe.storage.checkpoints"],
    "UnsafeLockFolderError": ["samplepipe.locks"],
    "UnsupportedValueError": ["samplepipe.storage.hdf5"],
}
PAIRS = [(name, module) for name, modules in HOMES.items() for module in modules]


def exception_classes_defined(path):
    """Names of the exception and warning classes a source file defines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
            if any(b.endswith(("Error", "Warning", "Exception")) for b in bases):
                found.append(node.name)
    return found


@pytest.mark.parametrize(("name", "module"), PAIRS, ids=lambda v: str(v))
def test_each_class_is_importable_where_it_was(name, module):
    cls = getattr(samplepipe.errors, name)
    assert getattr(importlib.import_module(module), name) is cls
    assert cls.__module__ == "samplepipe.errors"


def test_errors_lists_every_class_once():
    assert sorted(samplepipe.errors.__all__) == sorted(HOMES)
    for name in samplepipe.errors.__all__:
        assert issubclass(getattr(samplepipe.errors, name), Exception)


def test_no_other_module_defines_an_exception_class():
    defined = {
        str(path.relative_to(SRC)): exception_classes_defined(path)
        for path in sorted(SRC.rglob("*.py"))
    }
    assert sorted(defined.pop("errors.py")) == sorted(HOMES)
    assert {path: names for path, names in defined.items() if names} == {}


def test_errors_imports_only_the_standard_library():
    tree = ast.parse((SRC / "errors.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "errors.py imports no samplepipe module"
            imported.add((node.module or "").partition(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_importing_samplepipe_imports_no_prefect_or_distributed():
    code = "import sys, samplepipe.errors; print(sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    loaded = {name.partition(".")[0] for name in ast.literal_eval(out)}
    assert loaded & {"prefect", "distributed", "redis"} == set()


def test_attributes_are_kept():
    err = samplepipe.errors.PipelineRunError("boom", "scale", [("a", "bad")])
    assert (str(err), err.step, err.failures) == ("boom", "scale", [("a", "bad")])
    assert samplepipe.errors.CommandError("stop", code=3).code == 3
    assert samplepipe.errors.SampleFailures("x", [["k", "e"]]).failures == [["k", "e"]]
