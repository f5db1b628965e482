import copy
import os
import re

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from samplepipe import (
    CheckpointWrapper,
    DaskWrapper,
    SampleWrapper,
    ToDaskBag,
    getattr_nested,
    is_instance_nested,
    is_pipeline_wrapped,
    wrap,
)
from samplepipe.testing import CountingTransformer, count_rows


def test_builds_the_first_class_from_kwargs():
    est = wrap(
        [CountingTransformer, "sample", "checkpoint"],
        offset=2.0,
        features_dir="f",
        transform_extra_arguments=[],
    )
    assert isinstance(est, CheckpointWrapper)
    assert est.features_dir == "f"
    assert isinstance(est.estimator, SampleWrapper)
    assert est.estimator.estimator.offset == 2.0


def test_wraps_inside_out_with_case_insensitive_names():
    est = wrap(["Sample", "CHECKPOINT", "dask"], StandardScaler())
    assert isinstance(est, DaskWrapper)
    assert isinstance(est.estimator, CheckpointWrapper)
    assert isinstance(est.estimator.estimator, SampleWrapper)


def test_never_mutates_its_arguments():
    bases = ["sample", "checkpoint"]
    pipeline = make_pipeline(StandardScaler(), PCA(n_components=2))
    before = copy.deepcopy(pipeline.get_params(deep=False))
    wrapped = wrap(bases, pipeline, features_dir="f", model_path="m")
    assert bases == ["sample", "checkpoint"]
    assert [type(s) for _, s in pipeline.steps] == [StandardScaler, PCA]
    assert [n for n, _ in pipeline.steps] == [n for n, _ in before["steps"]]
    assert wrapped is not pipeline
    assert all(isinstance(s, CheckpointWrapper) for _, s in wrapped.steps)


@pytest.mark.parametrize(
    "estimator",
    [StandardScaler(), make_pipeline(StandardScaler(), PCA())],
    ids=["estimator", "pipeline"],
)
def test_unknown_kwargs_are_rejected_by_name(estimator):
    with pytest.raises(ValueError, match=re.escape("['featurs_dir']")):
        wrap(["sample", "checkpoint"], estimator, featurs_dir="f")


def test_unknown_base_name():
    with pytest.raises(ValueError, match="unknown base 'smaple'"):
        wrap(["smaple"], StandardScaler())


def test_pipeline_steps_get_their_own_folders_and_model_files(tmp_path, samples):
    log = str(tmp_path / "log")
    pipeline = Pipeline(
        [
            ("first", CountingTransformer(offset=1.0, log_path=log)),
            ("second", CountingTransformer(offset=2.0, log_path=log)),
        ]
    )
    wrapped = wrap(
        ["sample", "checkpoint"],
        pipeline,
        features_dir=str(tmp_path / "features"),
        model_path=str(tmp_path / "models"),
    )
    first, second = (s for _, s in wrapped.steps)
    assert first.features_dir == os.path.join(tmp_path, "features", "first")
    assert second.model_path == os.path.join(tmp_path, "models", "second.pkl")
    out = wrapped.fit(samples).transform(samples)
    assert sorted(os.listdir(tmp_path / "models")) == ["first.pkl", "second.pkl"]
    assert sorted(os.listdir(tmp_path / "features")) == ["first", "second"]
    X = np.stack([s.data for s in samples])
    step1 = X + 1.0 + X.mean(axis=0)
    expected = step1 + 2.0 + step1.mean(axis=0)
    np.testing.assert_allclose(np.stack([o.data for o in out]), expected)
    # fit_transform's transforms were checkpointed: transform reuses them
    rows = count_rows(log, "transform")
    wrapped.transform(samples)
    assert count_rows(log, "transform") == rows


def test_dask_inserts_a_bag_step_first():
    pipeline = make_pipeline(StandardScaler())
    wrapped = wrap(["sample", "dask"], pipeline, npartitions=3)
    assert isinstance(wrapped.steps[0][1], ToDaskBag)
    assert wrapped.steps[0][1].npartitions == 3
    assert len(pipeline.steps) == 1


def test_is_pipeline_wrapped_one_boolean_per_step_skipping_passthrough():
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            ("skip", "passthrough"),
            ("none", None),
            ("pca", PCA()),
        ]
    )
    wrapped = wrap(["sample", "checkpoint"], pipeline, features_dir="f")
    assert is_pipeline_wrapped(pipeline, SampleWrapper) == [False, False]
    assert is_pipeline_wrapped(wrapped, SampleWrapper) == [True, True]
    assert is_pipeline_wrapped(wrapped, CheckpointWrapper) == [True, True]
    assert is_pipeline_wrapped(wrapped, DaskWrapper) == [False, False]
    mixed = Pipeline([("a", SampleWrapper(PCA())), ("b", PCA())])
    assert is_pipeline_wrapped(mixed, SampleWrapper) == [True, False]
    dasked = wrap(["sample", "dask"], make_pipeline(PCA()))
    assert is_pipeline_wrapped(dasked, DaskWrapper) == [False, True]  # ToDaskBag


def test_is_pipeline_wrapped_rejects_a_non_pipeline():
    with pytest.raises(ValueError, match="is_pipeline_wrapped got SampleWrapper"):
        is_pipeline_wrapped(SampleWrapper(PCA()), SampleWrapper)


def test_is_instance_nested_follows_the_attribute():
    est = DaskWrapper(CheckpointWrapper(SampleWrapper(PCA())))
    assert is_instance_nested(est, "estimator", DaskWrapper)
    assert is_instance_nested(est, "estimator", SampleWrapper)
    assert is_instance_nested(est, "estimator", PCA)
    assert not is_instance_nested(est, "estimator", StandardScaler)
    assert not is_instance_nested(est, "other", SampleWrapper)
    assert is_instance_nested(est, "estimator", (StandardScaler, PCA))
    assert not is_instance_nested(PCA(), "estimator", SampleWrapper)


def test_getattr_nested_finds_the_first_level_with_the_attribute(samples):
    inner = LogisticRegression(C=3.0)
    est = DaskWrapper(
        CheckpointWrapper(
            SampleWrapper(inner, input_attribute="features"), model_path="m.pkl"
        )
    )
    assert getattr_nested(est, "model_path") == "m.pkl"
    assert getattr_nested(est, "C") == 3.0
    assert getattr_nested(est, "fit_tag") is None  # DaskWrapper's own, None
    assert getattr_nested(est, "input_attribute") == "features"
    assert getattr_nested(est, "no_such_attribute") is None
    assert getattr_nested(est, "estimator") is est.estimator
    SampleWrapper(inner, fit_extra_arguments=[("y", "target")]).fit(samples)
    assert getattr_nested(est, "coef_") is inner.coef_
