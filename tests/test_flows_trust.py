"""Issue 12 through the Prefect flows: cache keys and models are exact."""

import json
import os
import re

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from samplepipe.testing import CountingTransformer, count_rows

from ._prefect_helpers import run, task_runs
from .conftest import make_samples

pytestmark = [
    pytest.mark.slow,  # Prefect flow runs
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings("ignore::samplepipe.CheckpointWarning"),
]


def dirs(tmp_path):
    return {
        "features_dir": str(tmp_path / "features"),
        "model_dir": str(tmp_path / "models"),
        "batch_size": 10,
    }


def data(samples):
    return np.stack([s.data for s in samples])


def user_class(factor):
    namespace = {"__name__": "user_module"}
    source = (
        "import numpy as np\n"
        "from samplepipe.testing import CountingTransformer\n"
        "class Scale(CountingTransformer):\n"
        "    def transform(self, X):\n"
        f"        return super().transform(X) * {factor}\n"
    )
    exec(compile(source, "user_module", "exec"), namespace)
    return namespace["Scale"]


def test_flow_recomputes_after_the_step_code_was_edited(tmp_path):
    from samplepipe.flows import transform_pipeline

    log = str(tmp_path / "calls.log")
    samples = make_samples(20)

    def pipeline(factor):
        return Pipeline([("scale", user_class(factor)(log_path=log, stateless=True))])

    out = transform_pipeline(pipeline(2), samples, **dirs(tmp_path))
    np.testing.assert_allclose(data(out), data(samples) * 2)
    state, flow_run_id = run(transform_pipeline, pipeline(3), samples, **dirs(tmp_path))
    np.testing.assert_allclose(data(state.result()), data(samples) * 3)
    assert count_rows(log, "transform") == 40
    states = {r.name: r.state.name for r in task_runs(flow_run_id)}
    assert set(states.values()) == {"Completed"}  # no batch came back Cached


def test_flow_keeps_failed_samples_in_line_and_counts_them(tmp_path):
    from samplepipe.flows import transform_pipeline

    class FailFifth(TransformerMixin, BaseEstimator):
        def transform(self, X):
            return [None if x[0] % 10 == 4 else x + 1 for x in np.asarray(X)]

        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.requires_fit = False
            return tags

    samples = make_samples(50)
    for i, s in enumerate(samples):
        s.data = np.full(4, float(i))
    log = str(tmp_path / "last.log")
    pipe = Pipeline(
        [
            ("fail", FailFifth()),
            ("last", CountingTransformer(log_path=log, stateless=True)),
        ]
    )
    state, flow_run_id = run(transform_pipeline, pipe, samples, **dirs(tmp_path))
    out = state.result()
    assert len(out) == 50
    assert [o.key for o in out] == [s.key for s in samples]
    failed = [i for i, o in enumerate(out) if o.data is None]
    assert failed == [4, 14, 24, 34, 44]
    assert out[4].target == samples[4].target
    assert count_rows(log, "transform") == 45
    from ._prefect_helpers import artifacts

    table = next(a for a in artifacts(flow_run_id) if a.key == "samplepipe-summary")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["step"], r["failed"]) for r in rows] == [("fail", 5), ("last", 5)]
    # a cached re-run gives the same, in line
    again = transform_pipeline(pipe, samples, **dirs(tmp_path))
    assert [o.data is None for o in again] == [o.data is None for o in out]


def test_force_recomputes_in_the_flows(tmp_path):
    from samplepipe import CheckpointWrapper, SampleWrapper
    from samplepipe.flows import transform_pipeline

    log = str(tmp_path / "calls.log")
    samples = make_samples(20)

    def pipeline(force):
        step = CheckpointWrapper(
            SampleWrapper(CountingTransformer(log_path=log, stateless=True)),
            force=force,
        )
        return Pipeline([("count", step)])

    transform_pipeline(pipeline(False), samples, **dirs(tmp_path))
    state, flow_run_id = run(
        transform_pipeline, pipeline(True), samples, **dirs(tmp_path)
    )
    assert state.is_completed()
    assert count_rows(log, "transform") == 40
    assert {r.state.name for r in task_runs(flow_run_id)} == {"Completed"}


def test_transform_refuses_a_model_fitted_after_other_upstream_models(tmp_path):
    from samplepipe.flows import PipelineRunError, fit_pipeline, transform_pipeline

    train = make_samples(30)

    def pipeline(offset, fail_marker=None):
        return Pipeline(
            [
                ("first", CountingTransformer(offset=offset)),
                (
                    "second",
                    CountingTransformer(fail_marker=fail_marker, fail_on=None),
                ),
                ("third", StandardScaler()),
            ]
        )

    fit_pipeline(pipeline(1.0), train, **dirs(tmp_path))
    # a new first step; the fit fails before "second" is fitted again
    marker = tmp_path / "fail"
    marker.write_text("x")
    failing = pipeline(5.0)
    failing.steps[2] = ("third", BrokenFit())
    with pytest.raises(PipelineRunError):
        fit_pipeline(failing, train, **dirs(tmp_path), retries=0)
    with pytest.raises(PipelineRunError, match="fitted after other versions"):
        transform_pipeline(pipeline(5.0), train, **dirs(tmp_path))


class BrokenFit(TransformerMixin, BaseEstimator):
    def fit(self, X, y=None):
        raise ValueError("the fit of this step fails")

    def transform(self, X):
        return X


def test_transform_uses_the_fitted_pipeline_it_is_given(tmp_path):
    from samplepipe.flows import fit_pipeline, transform_pipeline

    train_a, train_b = make_samples(30, seed=1), make_samples(30, seed=2)
    fit_pipeline(Pipeline([("scale", StandardScaler())]), train_a, **dirs(tmp_path))
    fresh = fit_pipeline(
        Pipeline([("scale", StandardScaler())]),
        train_b,
        features_dir=str(tmp_path / "other"),
        model_dir=str(tmp_path / "other-models"),
    )
    out = transform_pipeline(fresh, train_a, **dirs(tmp_path))
    expected = StandardScaler().fit(data(train_b)).transform(data(train_a))
    np.testing.assert_allclose(data(out), expected)


def test_a_reordered_cached_manifest_is_not_used(tmp_path):
    from samplepipe.flows import transform_pipeline

    def reordered(manifest):
        # names the same files, in another order (its digest made consistent)
        assert len(manifest) == 10
        for column in ("keys", "inputs", "checksums", "kinds"):
            setattr(
                manifest, column, "\n".join(getattr(manifest, column).split("\n")[::-1])
            )
        manifest.name_of = manifest.name_of[::-1].copy()
        manifest.digest = manifest.chain_digest()

    pipe, samples, log = run_then_edit_its_manifest(tmp_path, reordered)
    state, flow_run_id = run(transform_pipeline, pipe, samples, **dirs(tmp_path))
    # in input order (the reversed manifest would give them reversed): the batch
    # ran again and loaded its valid checkpoints
    np.testing.assert_allclose(data(state.result()), data(samples))
    assert count_rows(log, "transform") == 10
    names = sorted(r.state.name for r in task_runs(flow_run_id))
    assert names == ["Cached", "Completed"]


def test_a_step_name_that_escapes_is_refused_before_work(tmp_path):
    from samplepipe.flows import transform_pipeline

    pipe = Pipeline([("../escaped", CountingTransformer(stateless=True))])
    with pytest.raises(ValueError, match=re.escape("step named '../escaped'")):
        transform_pipeline(pipe, make_samples(3), **dirs(tmp_path))
    assert not os.path.exists(tmp_path / "escaped")
    assert not os.path.exists(tmp_path / "features")


def test_a_swapped_file_behind_a_cached_manifest_is_noticed(tmp_path):
    import shutil

    from samplepipe.flows import transform_pipeline

    log = str(tmp_path / "calls.log")
    samples = make_samples(10)
    pipe = Pipeline([("count", CountingTransformer(log_path=log, stateless=True))])
    transform_pipeline(pipe, samples, **dirs(tmp_path))
    folder = tmp_path / "features" / "count" / "s"
    a, b = folder / "00000.h5", folder / "00001.h5"
    st = os.stat(a)
    shutil.copyfile(b, str(a) + ".new")  # same size: another sample's checkpoint
    os.utime(str(a) + ".new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(str(a) + ".new", a)
    assert (os.stat(a).st_size, os.stat(a).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    state, flow_run_id = run(transform_pipeline, pipe, samples, **dirs(tmp_path))
    out = state.result()
    np.testing.assert_allclose(out[0].data, samples[0].data)  # not sample 1's
    assert {r.state.name for r in task_runs(flow_run_id)} == {"Completed"}
    assert count_rows(log, "transform") == 11  # only the swapped one recomputed


def run_then_edit_its_manifest(tmp_path, edit):
    """Run a one-step flow over 10 samples, then ``edit`` its cached manifest.

    Returns ``(pipeline, samples, call log)``.
    """
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from samplepipe.flows import transform_pipeline

    log = str(tmp_path / "calls.log")
    samples = make_samples(10)
    pipe = Pipeline([("count", CountingTransformer(log_path=log, stateless=True))])
    storage = PREFECT_LOCAL_STORAGE_PATH.value()
    before = set(storage.glob("*"))
    transform_pipeline(pipe, samples, **dirs(tmp_path))
    (path,) = [p for p in storage.glob("*") if p not in before]
    from samplepipe.tasks import BatchManifest

    record = json.loads(path.read_text())
    manifest = BatchManifest.from_bytes(record["result"].encode())
    edit(manifest)
    record["result"] = manifest.to_bytes().decode()
    path.write_text(json.dumps(record))
    return pipe, samples, log


def test_flow_outputs_load_without_reading_their_records(tmp_path, monkeypatch):
    # the manifest carries each file's checksum and kind: a loader reads the
    # payload only (the file's own record is read when that fails)
    import samplepipe.storage.hdf5 as hdf5
    from samplepipe.flows import transform_pipeline

    samples = make_samples(10)
    pipe = Pipeline([("count", CountingTransformer(stateless=True))])
    outputs = [transform_pipeline(pipe, samples, **dirs(tmp_path)) for _ in range(2)]
    read_records = []
    real = hdf5.read
    monkeypatch.setattr(
        hdf5, "read", lambda path, *a: read_records.append(path) or real(path, *a)
    )
    for out in outputs:  # the first run's, then the cached run's
        np.testing.assert_allclose(data(out), data(samples))
    assert read_records == []


def test_a_wrong_checksum_in_a_cached_manifest_costs_a_read_not_a_value(tmp_path):
    from samplepipe.flows import transform_pipeline

    def wrong_checksum(manifest):
        checksums = manifest.checksums.split("\n")
        checksums[3] = "0" * len(checksums[3])
        manifest.checksums = "\n".join(checksums)

    pipe, samples, log = run_then_edit_its_manifest(tmp_path, wrong_checksum)
    state, flow_run_id = run(transform_pipeline, pipe, samples, **dirs(tmp_path))
    assert [r.state.name for r in task_runs(flow_run_id)] == ["Cached"]
    # the file is judged by its own record: the right value, nothing recomputed
    np.testing.assert_allclose(data(state.result()), data(samples))
    assert count_rows(log, "transform") == 10
