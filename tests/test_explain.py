"""`CheckpointWrapper.explain` and `verify` (issue 24, items 1 and 2).

One test per reason `explain` gives, each ingredient of the README's identity
table changed for real (code on disk, a parameter, the input, the fit, the
format, a library's version) and the file's own states (missing, damaged).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import warnings

import h5py
import numpy as np
import pytest
import sklearn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import FunctionTransformer

from samplepipe import (
    REASONS,
    CheckpointWarning,
    DelayedSample,
    Explanation,
    Sample,
    load_hdf5,
    save_hdf5,
    wrap,
)
from samplepipe.storage import TransformReport, identity, libraries
from samplepipe.wrappers._explain import descriptions_dir

from .conftest import make_samples


def times(X, factor=1.0):
    return np.asarray(X) * factor


def plus(X, term=0.0):
    return np.asarray(X) + term


def quiet_transform(step, samples):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        return step.transform(samples)


def checkpointed(estimator, tmp_path, **kwargs):
    return wrap(
        ["sample", "checkpoint"],
        estimator,
        features_dir=str(tmp_path / "f"),
        **kwargs,
    )


def reasons(explanations):
    return [(e.action, e.reason) for e in explanations]


def only(explanations):
    """The one (action, reason, detail) all ``explanations`` share."""
    found = {(e.action, e.reason, e.detail) for e in explanations}
    assert len(found) == 1, found
    return found.pop()


def test_same_and_missing(tmp_path):
    samples = make_samples(5)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path)
    quiet_transform(step, samples[:3])
    explained = step.explain(samples)
    assert all(isinstance(e, Explanation) for e in explained)
    assert [e.key for e in explained] == [s.key for s in samples]
    assert (
        reasons(explained) == [("reuse", "same")] * 3 + [("recompute", "missing")] * 2
    )
    assert {e.reason for e in explained} <= set(REASONS)
    # what explain says is what transform does
    report = TransformReport()
    step.transform_samples(samples, report)
    assert (report.loaded, report.computed) == (3, 2)


STEP = """
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
import helpers


class Step(TransformerMixin, BaseEstimator):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return helpers.scale(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags
"""


def test_code_names_the_edited_function(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (code / "explained_step.py").write_text(STEP)
    helpers = code / "helpers.py"
    helpers.write_text("def scale(X):\n    return X * 2.0\n")
    samples = make_samples(4)

    def load():
        for name in ("explained_step", "helpers"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        return importlib.import_module("explained_step").Step()

    try:
        step = checkpointed(load(), tmp_path)
        quiet_transform(step, samples)
        helpers.write_text("def scale(X):\n    return X * 3.0\n")
        step = checkpointed(load(), tmp_path)
        action, reason, detail = only(step.explain(samples))
    finally:
        for name in ("explained_step", "helpers"):
            sys.modules.pop(name, None)
    assert (action, reason) == ("recompute", "code")
    assert detail == "the code of scale changed"


def test_code_names_a_method_of_the_step(tmp_path):
    class Step(TransformerMixin, BaseEstimator):
        def fit(self, X, y=None):
            return self

        def transform(self, X):
            return np.asarray(X) + 1

    samples = make_samples(3)
    quiet_transform(checkpointed(Step(), tmp_path), samples)

    class Step(TransformerMixin, BaseEstimator):  # noqa: F811 - the edited class
        def fit(self, X, y=None):
            return self

        def transform(self, X):
            return np.asarray(X) + 2

    action, reason, detail = only(checkpointed(Step(), tmp_path).explain(samples))
    assert (action, reason) == ("recompute", "code")
    assert "Step.transform" in detail


def test_parameter_names_its_path_and_values(tmp_path):
    samples = make_samples(3)
    step = checkpointed(FunctionTransformer(times, kw_args={"factor": 2}), tmp_path)
    quiet_transform(step, samples)
    step.set_params(estimator__estimator__kw_args={"factor": 3})
    action, reason, detail = only(step.explain(samples))
    assert (action, reason) == ("recompute", "parameter")
    assert detail == (
        "parameter estimator__kw_args changed from {'factor': 2} to {'factor': 3}"
    )


def test_input_tells_content_loader_and_upstream_apart(tmp_path):
    samples = make_samples(4)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path)
    quiet_transform(step, samples)
    changed = [Sample(s.data + 1, parent=s) for s in samples[:2]] + samples[2:]
    explained = step.explain(changed)
    assert reasons(explained) == [("recompute", "input")] * 2 + [("reuse", "same")] * 2
    assert explained[0].detail == "the content of its input changed"

    # a loader: its data_version
    path = str(tmp_path / "raw.h5")
    save_hdf5(np.ones(4), path)

    def lazy(version):
        return [
            DelayedSample(
                functools.partial(load_hdf5, path), key="raw", data_version=version
            )
        ]

    loaded = checkpointed(FunctionTransformer(np.negative), tmp_path / "l")
    quiet_transform(loaded, lazy("v1"))
    action, reason, detail = only(loaded.explain(lazy("v2")))
    assert (action, reason) == ("recompute", "input")
    assert detail == "the sample's loader or its data_version changed"

    # an upstream checkpoint: the earlier step's parameters changed
    first = checkpointed(FunctionTransformer(plus, kw_args={"term": 1}), tmp_path / "a")
    second = checkpointed(FunctionTransformer(np.negative), tmp_path / "b")
    quiet_transform(second, quiet_transform(first, samples))
    first.set_params(estimator__estimator__kw_args={"term": 5})
    assert only(first.explain(samples))[1] == "parameter"
    upstream = quiet_transform(first, samples)
    action, reason, detail = only(second.explain(upstream))
    assert (action, reason) == ("recompute", "input")
    assert detail == "the checkpoint of an earlier step it was computed from changed"


def test_fitted_says_the_step_was_fitted_again(tmp_path):
    samples = make_samples(6)
    step = checkpointed(PCA(n_components=2), tmp_path)
    step.fit(samples[:3])
    quiet_transform(step, samples)
    step.fit(samples[3:])  # other training samples: another fit
    action, reason, detail = only(step.explain(samples))
    assert (action, reason) == ("recompute", "fitted")
    assert "fitted" in detail


def test_format_custom_functions_and_an_older_samplepipe(tmp_path):
    samples = make_samples(3)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path, extension=".h5")
    quiet_transform(step, samples)
    custom = checkpointed(
        FunctionTransformer(np.negative),
        tmp_path,
        save_func=save_hdf5,
        load_func=load_hdf5,
    )
    action, reason, detail = only(custom.explain(samples))
    assert (action, reason) == ("recompute", "format")
    assert "format" in detail

    # a checkpoint of record format 2 (an earlier samplepipe): said so
    path = step.checkpoint_paths([samples[0].key])[0]
    with h5py.File(path, "r+") as f:
        record = f.attrs["samplepipe"]
        assert record.startswith(f"{identity.FORMAT_VERSION}:")
        f.attrs["samplepipe"] = "2" + record[len(str(identity.FORMAT_VERSION)) :]
    explained = step.explain(samples)
    assert reasons(explained) == [("recompute", "format")] + [("reuse", "same")] * 2
    assert explained[0].detail == (
        f"written by an older samplepipe (record format 2, now "
        f"{identity.FORMAT_VERSION})"
    )


def test_library_names_the_distribution_and_versions(tmp_path, monkeypatch):
    samples = make_samples(3)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path)
    quiet_transform(step, samples)
    version = sklearn.__version__
    monkeypatch.setattr(sklearn, "__version__", "99.0")
    monkeypatch.setattr(libraries, "_module_cache", {})
    action, reason, detail = only(step.explain(samples))
    assert (action, reason) == ("recompute", "library")
    assert detail == f"library sklearn changed from {version} to 99.0"


def test_damaged_files_say_what_is_wrong(tmp_path):
    samples = make_samples(3)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path)
    quiet_transform(step, samples)
    paths = step.checkpoint_paths(s.key for s in samples)
    with h5py.File(paths[0], "r+") as f:  # flip a byte of the payload
        raw = f["array"][()].view(np.uint8).copy()
        raw[3] ^= 0x10
        f["array"][...] = raw.view(np.float64)
    os.remove(paths[1])
    with h5py.File(paths[1], "w") as f:  # a file samplepipe did not write
        f["array"] = np.zeros(3)
    explained = step.explain(samples)
    assert reasons(explained) == [
        ("recompute", "damaged"),
        ("recompute", "damaged"),
        ("reuse", "same"),
    ]
    assert "checksum" in explained[0].detail
    assert "not written by samplepipe" in explained[1].detail


def test_explain_writes_nothing_and_descriptions_live_outside(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLEPIPE_DESCRIPTIONS", str(tmp_path / "descriptions"))
    samples = make_samples(4)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path)
    quiet_transform(step, samples[:2])
    root = tmp_path / "f"
    assert sorted(p.name for p in root.rglob("*")) == ["00000.h5", "00001.h5", "s"]
    described = {p.stem for p in (tmp_path / "descriptions").iterdir()}
    assert described == {step.describe_step()["step"]}
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    step.set_params(estimator__estimator__kw_args={})
    assert only(step.explain(samples[:2]))[1] == "parameter"
    step.explain(samples)
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    path = os.path.join(descriptions_dir(), f"{next(iter(described))}.json")
    with open(path) as f:
        assert json.load(f)["parameter"]["estimator__func"][1] == "<negative>"
    # without it, the reason is not guessed: the step changed, unnamed
    os.remove(path)
    action, reason, detail = only(step.explain(samples[:2]))
    assert (action, reason) == ("recompute", "format")
    assert "cannot be named" in detail


def test_shards_are_explained_too(tmp_path):
    samples = make_samples(5)
    step = checkpointed(
        FunctionTransformer(np.negative), tmp_path, layout="shards", shard_size=2
    )
    quiet_transform(step, samples[:4])
    step.set_params(estimator__estimator__kw_args={})
    explained = step.explain(samples)
    assert reasons(explained) == [("recompute", "parameter")] * 4 + [
        ("recompute", "missing")
    ]
    assert all(s not in ("unknown",) for _, s, _ in step.iter_checkpoints())


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------
class ReadsAFile(TransformerMixin, BaseEstimator):
    """Adds a number read from a file: a dependency its identity cannot see."""

    def __init__(self, path=None):
        self.path = path

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        with open(self.path) as f:
            return np.asarray(X) + float(f.read())

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


def test_verify_finds_a_dependency_the_identity_cannot_see(tmp_path):
    number = tmp_path / "number.txt"
    number.write_text("1")
    samples = make_samples(20)
    step = checkpointed(ReadsAFile(str(number)), tmp_path)
    quiet_transform(step, samples)
    root = tmp_path / "f"
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))

    report = step.verify(samples, fraction=0.25, seed=0)
    assert (report.reused, report.checked, report.mismatches) == (20, 5, [])

    number.write_text("2")  # the file changed: the identity did not
    report = step.verify(samples, fraction=0.25, seed=0)
    assert report.checked == 5
    assert len(report.mismatches) == 5
    assert set(report.mismatches) <= {s.key for s in samples}
    # the same seed, the same samples
    assert step.verify(samples, fraction=0.25, seed=0).mismatches == report.mismatches
    # nothing was written
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_verify_tolerances_and_bad_fraction(tmp_path):
    samples = make_samples(10)
    step = checkpointed(FunctionTransformer(np.negative), tmp_path)
    quiet_transform(step, samples[:6])
    report = step.verify(samples, fraction=1.0)
    assert (report.reused, report.checked, report.mismatches) == (6, 6, [])
    assert step.verify(samples, fraction=0.01).checked == 1
    for fraction in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="verify got fraction="):
            step.verify(samples, fraction=fraction)


# ---------------------------------------------------------------------------
# fit(None): a trained model without its data (issue 24, item 5)
# ---------------------------------------------------------------------------
def test_fit_none_loads_a_matching_model_without_calling_the_estimator(tmp_path):
    from samplepipe.testing import CountingTransformer, read_calls

    log = tmp_path / "calls.log"
    samples = make_samples(8)
    kwargs = {"model_path": str(tmp_path / "model.pkl")}
    first = checkpointed(CountingTransformer(log_path=str(log)), tmp_path, **kwargs)
    first.fit(samples)
    fits = [c for c in read_calls(log) if c[0] == "fit"]
    assert len(fits) == 1
    again = checkpointed(CountingTransformer(log_path=str(log)), tmp_path, **kwargs)
    assert again.fit(None) is again
    assert [c for c in read_calls(log) if c[0] == "fit"] == fits  # not fitted
    np.testing.assert_array_equal(
        again.estimator.estimator.mean_, first.estimator.estimator.mean_
    )
    assert only(again.explain(samples))[:2] == ("recompute", "missing")
    # other parameters: that model is not this step's
    other = checkpointed(
        CountingTransformer(offset=1.0, log_path=str(log)), tmp_path, **kwargs
    )
    with pytest.raises(ValueError, match=r"fit\(None\) loads a trained model"):
        other.fit(None)
    missing = checkpointed(
        CountingTransformer(), tmp_path, model_path=str(tmp_path / "none.pkl")
    )
    with pytest.raises(ValueError, match="none.pkl"):
        missing.fit(None)
    assert not (tmp_path / "none.pkl").exists()


def test_a_pipeline_is_explained_and_verified_step_by_step(tmp_path):
    """The CLI's walk: each step's planned outputs are the next step's inputs."""
    samples = make_samples(6)
    steps = [
        checkpointed(
            FunctionTransformer(plus, kw_args={"term": 1.0}),
            tmp_path / "a",
            layout="shards",
        ),
        checkpointed(
            FunctionTransformer(times, kw_args={"factor": 2.0}), tmp_path / "b"
        ),
    ]
    current = samples
    for step in steps:
        current = quiet_transform(step, current)
    steps[0].set_params(estimator__estimator__kw_args={"term": 2.0})
    current = samples[:3]
    answers = []
    for step in steps:
        answers.append(only(step.explain(current))[:2])
        current = step.planned_outputs(current)
    assert answers == [("recompute", "parameter"), ("recompute", "input")]
    # verify: reused samples only, loaded through the planned outputs
    steps[0].set_params(estimator__estimator__kw_args={"term": 1.0})
    current = samples
    for step in steps:
        report = step.verify(current, fraction=1.0)
        assert (report.reused, report.checked, report.mismatches) == (6, 6, [])
        current = step.planned_outputs(current)
