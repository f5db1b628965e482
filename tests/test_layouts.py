"""Layouts as backends: `Layout`, `register_layout`, `get_layout`, and the house rules.

A user's own layout (one file per sample, nested two folders deep by a digest
of the key) is registered by name and used by `CheckpointWrapper`; its files
are found on disk where it puts them, reused, judged, cleaned. The module size
and import-direction rules of issue 23 are checked here too.
"""

from __future__ import annotations

import ast
import inspect
import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.base import clone

import samplepipe
from samplepipe import CheckpointWarning, CheckpointWrapper, SampleWrapper
from samplepipe.storage import (
    FilesLayout,
    Layout,
    ShardsLayout,
    get_layout,
    register_layout,
    registered_layouts,
)
from samplepipe.testing import CountingTransformer, NestedFilesLayout, count_rows

from .conftest import make_samples

SRC = Path(samplepipe.__file__).parent


register_layout("test-nested", NestedFilesLayout)


def nested_step(tmp_path, offset=1.0, layout="test-nested", **kwargs):
    log = str(tmp_path / "calls.log")
    inner = SampleWrapper(
        CountingTransformer(offset=offset, log_path=log, stateless=True)
    )
    wrapper = CheckpointWrapper(
        inner, features_dir=str(tmp_path / "f"), layout=layout, **kwargs
    )
    return wrapper, log


def files_under(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, files in os.walk(folder)
        for f in files
    )


# ---------------------------------------------------------------------------
# a user's layout, registered by name
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["name", "instance"])
def test_a_registered_user_layout_places_reuses_judges_and_cleans(tmp_path, how):
    layout = "test-nested" if how == "name" else NestedFilesLayout()
    samples = make_samples(6)
    wrapper, log = nested_step(tmp_path, layout=layout)
    first = wrapper.transform(samples)
    expected = sorted(
        f"{NestedFilesLayout.bucket(s.key)}/{s.key}.h5".replace("/", os.sep)
        for s in samples
    )
    assert files_under(tmp_path / "f") == expected
    key = samples[0].key
    assert wrapper.checkpoint_path(key) == str(
        tmp_path / "f" / NestedFilesLayout.bucket(key) / f"{key}.h5"
    )
    assert count_rows(log, "transform") == 6
    # a re-run in a new wrapper (a clone) reuses every checkpoint
    again, _ = nested_step(tmp_path, layout=layout)
    second = again.transform(samples)
    assert count_rows(log, "transform") == 6
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.data, b.data)
    for s, out in zip(samples, second):
        np.testing.assert_array_equal(out.data, s.data + 1.0)
    # two new samples alone are computed
    again.transform(make_samples(8))
    assert count_rows(log, "transform") == 8
    assert [s for _, s, _ in again.iter_checkpoints()] == ["valid"] * 8
    assert again.remove_checkpoints() == []
    # another step's files are stale there, and removed; a stray file is kept
    other, _ = nested_step(tmp_path, offset=2.0, layout=layout)
    with h5py.File(tmp_path / "f" / "notes.h5", "w") as f:  # the user's own
        f["raw"] = np.arange(3)
    statuses = sorted(s for _, s, _ in other.iter_checkpoints())
    assert statuses == ["stale"] * 8 + ["unknown"]
    removed = other.remove_checkpoints()
    assert sorted(state for _, state, _ in removed) == ["stale"] * 8
    assert files_under(tmp_path / "f") == ["notes.h5"]
    other.transform(samples)  # nothing stale left: no warning
    assert count_rows(log, "transform") == 14


def test_a_user_layout_file_is_recomputed_when_damaged(tmp_path):
    samples = make_samples(3)
    wrapper, log = nested_step(tmp_path)
    wrapper.transform(samples)
    path = wrapper.checkpoint_path(samples[1].key)
    blob = Path(path).read_bytes()
    out = np.ascontiguousarray(samples[1].data + 1.0, dtype="<f8").tobytes()
    at = blob.index(out)  # the payload's bytes, found by content
    Path(path).write_bytes(blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :])
    with pytest.warns(CheckpointWarning, match="1 corrupt"):
        out = nested_step(tmp_path)[0].transform(samples)
    np.testing.assert_array_equal(out[1].data, samples[1].data + 1.0)
    assert count_rows(log, "transform") == 4


def test_the_layout_parameter_survives_get_params_set_params_clone_and_pickle(
    tmp_path,
):
    instance = NestedFilesLayout()
    wrapper, _ = nested_step(tmp_path, layout=instance)
    assert wrapper.get_params()["layout"] is instance  # stored as given
    copy = clone(wrapper)
    assert isinstance(copy.layout, NestedFilesLayout) and copy.layout == instance
    assert pickle.loads(pickle.dumps(wrapper)).layout == instance
    wrapper.set_params(layout="shards")
    assert wrapper.layout == "shards"
    assert clone(wrapper).get_params()["layout"] == "shards"


@pytest.mark.parametrize("layout", ["files", "shards", "test-nested"])
def test_every_layout_gets_checked_keys_also_with_identities_given(tmp_path, layout):
    wrapper, log = nested_step(tmp_path, layout=layout)
    samples = make_samples(3)
    samples[2].key = samples[0].key
    ids = (wrapper.step_identity(), wrapper.input_identities(samples))
    with pytest.raises(ValueError, match="for samples 0 and 2; keys must be unique"):
        wrapper.transform_samples(samples, identities=ids)
    samples[2].key = "../evil"
    with pytest.raises(ValueError, match=re.escape("got key '../evil' for sample 2")):
        wrapper.transform_samples(samples, identities=ids)
    assert not os.path.exists(log)


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------
def test_built_in_layouts_are_registered():
    assert {"files", "shards"} <= set(registered_layouts())
    assert type(get_layout("files")) is FilesLayout
    assert type(get_layout("shards")) is ShardsLayout
    mine = NestedFilesLayout()
    assert get_layout(mine) is mine


def test_get_layout_names_the_parameter_and_the_registered_layouts(tmp_path):
    names = repr(registered_layouts())
    with pytest.raises(ValueError, match=re.escape(f"registered: {names}")) as info:
        get_layout("rows")
    assert "get_layout got layout='rows'" in str(info.value)
    with pytest.raises(TypeError, match=r"got layout=3; .*Layout instance"):
        get_layout(3)
    wrapper, _ = nested_step(tmp_path, layout="rows")
    with pytest.raises(
        ValueError, match=re.escape("CheckpointWrapper got layout='rows'; it must be")
    ) as info:
        wrapper.transform(make_samples(2))
    assert names in str(info.value) and "register_layout" in str(info.value)
    assert not (tmp_path / "f").exists()
    wrapper.set_params(layout=FilesLayout)  # the class, not an instance
    with pytest.raises(TypeError, match="CheckpointWrapper got layout=<class"):
        wrapper.transform(make_samples(2))


def test_register_layout_checks_its_arguments():
    with pytest.raises(ValueError, match="register_layout got name='a b'"):
        register_layout("a b", NestedFilesLayout)
    with pytest.raises(TypeError, match="subclass of samplepipe.storage.Layout"):
        register_layout("not-a-layout", dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot replace the built-in layout 'files'"):
        register_layout("files", NestedFilesLayout)
    register_layout("test-nested", NestedFilesLayout)  # the same class again: fine


def test_compact_needs_a_layout_that_compacts(tmp_path):
    wrapper, _ = nested_step(tmp_path)
    with pytest.raises(ValueError, match="needs layout='shards'"):
        wrapper.compact_checkpoints()


def test_a_bare_layout_subclass_says_what_it_must_implement(tmp_path):
    class Nothing(Layout):
        pass

    wrapper, _ = nested_step(tmp_path, layout=Nothing())
    with pytest.raises(NotImplementedError):
        wrapper.transform(make_samples(1))


# ---------------------------------------------------------------------------
# the house rules of issue 23
# ---------------------------------------------------------------------------
MAX_MODULE_LINES = 800
MAX_CHECKPOINT_WRAPPER_LINES = 500


def test_no_module_is_over_800_lines():
    lengths = {
        str(path.relative_to(SRC)): len(path.read_text().splitlines())
        for path in SRC.rglob("*.py")
    }
    assert len(lengths) > 40  # the package's modules were found
    over = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not over, over


def test_checkpoint_wrapper_is_at_most_500_lines():
    lines, _ = inspect.getsourcelines(CheckpointWrapper)
    assert len(lines) <= MAX_CHECKPOINT_WRAPPER_LINES, len(lines)


def imports_of(path):
    """Every module ``path`` imports, at module level or inside functions."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def module_name(path):
    name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def test_storage_never_imports_the_wrappers_or_higher_layers():
    for path in (SRC / "storage").rglob("*.py"):
        wrong = {
            m
            for m in imports_of(path)
            if m.startswith(("samplepipe.wrappers", "samplepipe.tasks"))
            or m.startswith(("samplepipe.flows", "samplepipe.cli"))
        }
        assert not wrong, f"{module_name(path)} imports {sorted(wrong)}"


def test_no_import_cycle_among_the_wrapper_and_storage_modules():
    """No module reaches itself through imports, at import or call time."""
    paths = [*(SRC / "storage").rglob("*.py"), *(SRC / "wrappers").rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    graph = {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # a package's __init__ re-exports its modules: importing a submodule
    # runs it first, so an edge to a package is an edge to its __init__ only
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start and not (start in packages or node in packages):
                    return [*trail, nxt]
                if nxt not in seen and nxt not in packages:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(modules)) if c]
    assert not cycles, cycles[0]
    assert "samplepipe.wrappers._checkpoint" not in graph["samplepipe.wrappers._shards"]
    for layout_module in ("files", "shards", "base"):
        name = f"samplepipe.storage.layouts.{layout_module}"
        assert not any(m.startswith("samplepipe.wrappers") for m in graph[name])
