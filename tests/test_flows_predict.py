"""Issue 14: predictions, per-sample failures and early errors in the flows."""

import errno
import os
import re

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from samplepipe import SampleWrapper
from samplepipe.testing import CountingTransformer, count_rows, read_calls

from ._prefect_helpers import artifacts, run, task_runs
from .conftest import make_samples
from .test_flows import data
from .test_flows import dirs as flow_dirs

pytestmark = [
    pytest.mark.slow,  # Prefect flow runs
    pytest.mark.usefixtures("prefect_harness"),
]


def dirs(tmp_path, batch_size=10):
    return flow_dirs(tmp_path, batch_size=batch_size)


def classifier_pipeline():
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "clf",
                SampleWrapper(
                    LogisticRegression(), fit_extra_arguments=[("y", "target")]
                ),
            ),
        ]
    )


@pytest.fixture
def fitted_classifier(tmp_path):
    from samplepipe.flows import fit_pipeline

    train = make_samples(60, seed=1)
    fit_pipeline(classifier_pipeline(), train, **dirs(tmp_path))
    reference = Pipeline([("s", StandardScaler()), ("c", LogisticRegression())])
    reference.fit(data(train), [s.target for s in train])
    return reference


@pytest.mark.parametrize("method", ["predict", "predict_proba", "decision_function"])
def test_flows_return_checkpointed_predictions(tmp_path, fitted_classifier, method):
    from samplepipe.flows import transform_pipeline

    test = make_samples(30, seed=2, prefix="test")
    out = transform_pipeline(
        classifier_pipeline(), test, method=method, **dirs(tmp_path)
    )
    expected = getattr(fitted_classifier, method)(data(test))
    np.testing.assert_allclose(data(out), expected)
    assert [o.key for o in out] == [s.key for s in test]
    assert out[3].target == test[3].target
    folder = tmp_path / "features" / f"clf.{method}" / "test"
    assert len(os.listdir(folder)) == 30  # one checkpoint per sample
    state, flow_run_id = run(
        transform_pipeline, classifier_pipeline(), test, method=method, **dirs(tmp_path)
    )
    assert {r.state.name for r in task_runs(flow_run_id)} == {"Cached"}
    np.testing.assert_allclose(data(state.result()), expected)


def test_a_last_step_without_the_method_fails_before_any_work(
    tmp_path, fitted_classifier
):
    from samplepipe.flows import run_pipeline, transform_pipeline

    test = make_samples(30, seed=2, prefix="test")
    msg = (
        "method='transform': the last step 'clf' (SampleWrapper) has no 'transform'; "
        "it has ['predict', 'predict_proba', 'predict_log_proba', 'decision_function']"
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        transform_pipeline(classifier_pipeline(), test, **dirs(tmp_path))
    assert not (tmp_path / "features" / "scale" / "test").exists()  # nothing done
    other = tmp_path / "other"
    with pytest.raises(ValueError, match=re.escape(msg)):
        run_pipeline(classifier_pipeline(), make_samples(10), test, **dirs(other))
    assert not other.exists()  # not even the fit ran


class FailOn(TransformerMixin, BaseEstimator):
    """Raises for samples whose first value is in ``bad`` (while ``marker`` exists)."""

    def __init__(self, bad=(), marker=None, log_path=None):
        self.bad = bad
        self.marker = marker
        self.log_path = log_path

    def transform(self, X):
        X = np.asarray(X)
        failing = self.marker is None or os.path.exists(self.marker)
        hit = [x for x in X[:, 0] if x in self.bad]
        if failing and hit:
            raise ValueError(f"cannot handle {hit[0]:g}")
        with open(self.log_path, "a") as f:
            f.write(f"transform {len(X)} 0\n")
        return X + 1

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


def numbered(n):
    samples = make_samples(n)
    for i, s in enumerate(samples):
        s.data = np.full(3, float(i))
    return samples


def test_failing_samples_are_isolated_and_the_rest_checkpointed(tmp_path):
    from samplepipe.flows import PipelineRunError, transform_pipeline

    samples = numbered(40)
    marker = tmp_path / "broken"
    marker.write_text("x")
    log = str(tmp_path / "calls.log")
    pipe = Pipeline(
        [("step", FailOn(bad=(27.0, 3.0, 5.0), marker=str(marker), log_path=log))]
    )
    state, flow_run_id = run(transform_pipeline, pipe, samples, **dirs(tmp_path))
    assert state.is_failed()
    with pytest.raises(PipelineRunError) as info:
        state.result()
    error = info.value
    assert error.step == "step"
    keys = [samples[i].key for i in (3, 5, 27)]  # input order, across batches
    assert [k for k, _ in error.failures] == keys
    assert "cannot handle 3" in error.failures[0][1]
    message = str(error)
    assert "batches [0:10], [20:30]" in message and repr(keys[0]) in message
    written = os.listdir(tmp_path / "features" / "step" / "s")
    assert len(written) == 37  # every other sample of the failed batches too
    table = next(a for a in artifacts(flow_run_id) if a.key == "samplepipe-failures")
    assert keys[2] in str(table.data)
    before = count_rows(log, "transform")
    marker.unlink()  # the cause is fixed: a new run computes only the 3
    out = transform_pipeline(pipe, samples, **dirs(tmp_path))
    assert count_rows(log, "transform") - before == 3
    np.testing.assert_allclose(data(out), data(samples) + 1)


def test_on_error_skip_keeps_failed_samples_in_line(tmp_path):
    from samplepipe.flows import transform_pipeline

    samples = numbered(25)
    log = str(tmp_path / "calls.log")
    pipe = Pipeline(
        [
            ("step", FailOn(bad=(4.0, 20.0), log_path=log)),
            ("next", CountingTransformer(stateless=True, log_path=log)),
        ]
    )
    state, flow_run_id = run(
        transform_pipeline, pipe, samples, on_error="skip", **dirs(tmp_path)
    )
    assert state.is_completed()
    out = state.result()
    assert [o.key for o in out] == [s.key for s in samples]
    assert [i for i, o in enumerate(out) if o.data is None] == [4, 20]
    summary = next(a for a in artifacts(flow_run_id) if a.key == "samplepipe-summary")
    rows = (
        summary.data
        if isinstance(summary.data, list)
        else __import__("json").loads(summary.data)
    )
    assert [(r["step"], r["failed"]) for r in rows] == [("step", 2), ("next", 2)]
    assert sum(n for m, n in read_calls(log) if m == "transform") > 0


def test_a_file_in_the_way_is_an_error_before_any_work(tmp_path):
    from samplepipe.flows import fit_pipeline

    log = str(tmp_path / "fit.log")
    pipe = Pipeline([("count", CountingTransformer(log_path=log))])
    (tmp_path / "models").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=re.escape(str(tmp_path / "models"))):
        fit_pipeline(pipe, make_samples(10), **dirs(tmp_path))
    assert read_calls(log) == []
    (tmp_path / "models").unlink()
    (tmp_path / "features").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="features_dir of step 'count'"):
        fit_pipeline(pipe, make_samples(10), **dirs(tmp_path))
    assert read_calls(log) == []
    (tmp_path / "features").unlink()
    (tmp_path / "models" / "count.pkl").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=re.escape("count.pkl")):
        fit_pipeline(pipe, make_samples(10), **dirs(tmp_path))
    assert read_calls(log) == []


def test_permanent_errors_are_not_retried(tmp_path):
    from samplepipe.flows import transform_pipeline

    class Full(CountingTransformer):
        def transform(self, X):
            super().transform(X)
            raise OSError(errno.ENOSPC, "No space left on device")

    log = str(tmp_path / "calls.log")
    pipe = Pipeline([("full", Full(stateless=True, log_path=log))])
    state, flow_run_id = run(
        transform_pipeline,
        pipe,
        make_samples(5),
        retries=3,
        retry_delay_seconds=0,
        **dirs(tmp_path),
    )
    assert state.is_failed()
    assert read_calls(log, "transform") == [("transform", 5)]  # tried once
    (task,) = task_runs(flow_run_id)
    assert task.run_count == 1


def test_the_retry_rule_is_the_wrappers_rule():
    from prefect.states import Failed

    from samplepipe.storage import is_permanent
    from samplepipe.tasks import retry_on_io_error

    cases = [
        OSError(errno.EIO, "I/O error"),
        OSError(errno.ENOSPC, "full"),
        PermissionError(errno.EACCES, "denied"),
        IsADirectoryError(errno.EISDIR, "folder"),
        ValueError("a bug"),
    ]
    for exc in cases:
        state = Failed(data=exc)
        assert retry_on_io_error(None, None, state) == (not is_permanent(exc))
    assert [not is_permanent(e) for e in cases] == [True, False, False, False, False]


def test_empty_samples(tmp_path):
    from samplepipe.flows import fit_pipeline, transform_pipeline

    pipe = Pipeline([("count", CountingTransformer(stateless=True))])
    assert transform_pipeline(pipe, [], **dirs(tmp_path)) == []
    with pytest.raises(ValueError, match="samples is empty: there is nothing to fit"):
        fit_pipeline(Pipeline([("s", StandardScaler())]), [], **dirs(tmp_path))
