"""The flow layer uses only the public contract of the wrappers and the storage.

`samplepipe.tasks`, `samplepipe._manifest`, `samplepipe.flows` and
`samplepipe._schedule` talk to `samplepipe.wrappers` and `samplepipe.storage`
through names those packages export on purpose (house style, "Layers talk
through a public contract"). The scan below reads their syntax trees: no
attribute with a leading underscore on an object of another module, no
``_private`` name imported, no import from another package's private module.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import samplepipe

SRC = Path(samplepipe.__file__).parent
SCANNED = ("tasks.py", "_manifest.py", "flows.py", "_schedule.py")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_names(tree: ast.Module) -> set[str]:
    """Names the module defines at its top level (classes, functions, globals)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def offences(source: str, package: str = "samplepipe") -> list[str]:
    """What a module of ``package`` reaches of others' privates, one line each.

    * ``obj._name`` where ``obj`` is not ``self``/``cls`` nor a name the
      module itself defines (dunders such as ``__doc__`` are public);
    * ``from x import _name`` (from any module);
    * ``from .pkg._module import name``: a private module of another package
      (a private module of this module's own package is fine: it is internal).
    """
    tree = ast.parse(source)
    own = _module_names(tree) | {"self", "cls"}
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in own:
                continue
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: imports {alias.name}")
            parts = (node.module or "").split(".")
            # a relative import of depth 1 names a module of this package:
            # ``from ._prefect import x`` is internal, ``from .wrappers._x`` is not
            if node.level >= 1 and len(parts) > 1:
                if any(_private(p) for p in parts[1:]):
                    found.append(f"line {node.lineno}: imports from {node.module}")
            elif node.level == 0 and parts[0] == package:
                if any(_private(p) for p in parts[2:]):
                    found.append(f"line {node.lineno}: imports from {node.module}")
    return found


@pytest.mark.parametrize("name", SCANNED)
def test_flow_layer_uses_only_public_names(name):
    found = offences((SRC / name).read_text(encoding="utf-8"))
    assert not found, f"samplepipe/{name} reaches private names:\n" + "\n".join(found)


BROKEN = textwrap.dedent(
    """
    from .wrappers._checkpoint import lazy_output
    from .storage import _helper
    from ._prefect import unvisited
    from .storage.layouts import gc_paused
    _CACHE = {}

    def run(step, outputs):
        step._sample_attribute()
        outputs._add(1)
        _CACHE._private_but_own = 1
        step.__doc__
        return self._mine
    """
)


def test_the_scan_catches_each_kind_of_reach():
    """A deliberately broken module: each offence is found, nothing else."""
    assert offences(BROKEN) == [
        "line 2: imports from wrappers._checkpoint",
        "line 3: imports _helper",
        "line 9: step._sample_attribute",
        "line 10: outputs._add",
    ]


def test_fit_or_load_says_which_and_compares_upstream(tmp_path):
    """What the flows' fit task relies on (it no longer fits by itself)."""
    from samplepipe import CheckpointWrapper, SampleWrapper

    from .conftest import make_samples

    samples = make_samples(5)

    def step():
        from sklearn.preprocessing import StandardScaler

        return CheckpointWrapper(
            SampleWrapper(StandardScaler()),
            features_dir=str(tmp_path / "features"),
            model_path=str(tmp_path / "model.pkl"),
        )

    assert step().fit_or_load(samples, upstream="u1") is True
    assert step().fit_or_load(samples, upstream="u1") is False  # loaded
    assert step().fit_or_load(samples, upstream="u2") is True  # other upstream
    assert step().fit(samples).fitted_digest_ is not None
