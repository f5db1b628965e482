import re

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from samplepipe import DelayedSample, Sample, SampleSet, SampleWrapper
from samplepipe.testing import CountingTransformer, count_rows


class AddOffset(TransformerMixin, BaseEstimator):
    def fit(self, X, y=None):
        return self

    def transform(self, X, offset):
        return np.asarray(X) + np.asarray(offset)[:, None]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


class DeclaresDefaults(AddOffset):
    """Declares its extra arguments, as a library author would."""

    def __samplepipe_tags__(self):
        return {"transform_extra_arguments": [("offset", "offset")]}


class RecordsFit(BaseEstimator):
    def fit(self, X, y=None, groups=None):
        self.seen_ = (np.asarray(X).copy(), y, groups)
        return self

    def transform(self, X):
        return np.asarray(X)


class WrongLength(AddOffset):
    def transform(self, X, offset=None):
        return np.asarray(X)[:-1]


def data(samples):
    return np.stack([s.data for s in samples])


def test_transform_passes_extra_arguments_and_keeps_metadata(samples):
    wrapper = SampleWrapper(AddOffset(), [("offset", "offset")])
    out = wrapper.transform(samples)
    assert len(out) == len(samples)
    for s, o in zip(samples, out):
        np.testing.assert_allclose(o.data, s.data + s.offset)
        assert (o.key, o.target, o.offset) == (s.key, s.target, s.offset)


def test_fit_feeds_fit_extra_arguments(samples):
    wrapper = SampleWrapper(
        RecordsFit(), fit_extra_arguments=[("y", "target"), ("groups", "offset")]
    )
    wrapper.fit(samples)
    X, y, groups = wrapper.estimator.seen_
    np.testing.assert_array_equal(X, np.stack([s.data for s in samples]))
    assert y == [s.target for s in samples]
    assert groups == [s.offset for s in samples]


def test_fit_with_y_is_a_type_error_that_names_the_fix(samples):
    with pytest.raises(TypeError, match=re.escape("fit_extra_arguments=[('y'")):
        SampleWrapper(StandardScaler()).fit(samples, y=[0] * len(samples))


@pytest.mark.parametrize(
    "estimator",
    [FunctionTransformer(np.abs), CountingTransformer(stateless=True)],
)
def test_estimators_that_need_no_fit_are_not_fitted(tmp_path, samples, estimator):
    log = tmp_path / "calls.log"
    if isinstance(estimator, CountingTransformer):
        estimator.set_params(log_path=str(log))
    SampleWrapper(estimator).fit(samples)
    assert count_rows(log, "fit") == 0
    assert not hasattr(estimator, "mean_")


def test_predict_proba_decision_function_and_score(samples):
    wrapper = SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "target")])
    wrapper.fit(samples)
    X = np.stack([s.data for s in samples])
    proba = wrapper.predict_proba(samples)
    np.testing.assert_allclose(
        np.stack([p.data for p in proba]), wrapper.estimator.predict_proba(X)
    )
    assert [p.data for p in wrapper.predict(samples)] == list(
        wrapper.estimator.predict(X)
    )
    scores = wrapper.decision_function(samples)
    assert scores[0].key == samples[0].key
    assert wrapper.score(samples) == wrapper.estimator.score(
        X, [s.target for s in samples]
    )


def test_sample_sets_keep_their_structure(samples):
    sets = [SampleSet(samples[:3], key="a"), SampleSet(samples[3:5], key="b")]
    wrapper = SampleWrapper(StandardScaler()).fit(samples)
    out = wrapper.transform(sets)
    assert [type(s) for s in out] == [SampleSet, SampleSet]
    assert [len(s) for s in out] == [3, 2]
    assert out[1].key == "b"
    assert out[1][0].key == samples[3].key
    flat = wrapper.transform(samples[:5])
    np.testing.assert_allclose(out[1][1].data, flat[4].data)


def test_none_inputs_are_skipped_and_stay_in_line_with_their_metadata(tmp_path):
    log = str(tmp_path / "log")
    wrapper = SampleWrapper(CountingTransformer(stateless=True, log_path=log))
    inputs = [
        Sample(np.ones(2), key="a", target=1),
        Sample(None, key="b", target=2),
        Sample(np.zeros(2), key="c", target=3),
    ]
    out = wrapper.transform(inputs)
    assert [type(o) for o in out] == [Sample, Sample, Sample]
    assert [(o.key, o.target) for o in out] == [("a", 1), ("b", 2), ("c", 3)]
    assert out[1].data is None and out[1] is not inputs[1]
    np.testing.assert_array_equal(out[0].data, np.ones(2))
    np.testing.assert_array_equal(out[2].data, np.zeros(2))
    assert count_rows(log, "transform") == 2  # the None input was not given
    # every input invalid: the estimator is not called at all
    assert wrapper.transform([Sample(None, key="x", target=0)]) == [
        Sample(None, key="x", target=0)
    ]
    assert count_rows(log, "transform") == 2


class NoneForNegatives(BaseEstimator):
    """Fails (returns None) for rows whose first value is negative."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return [None if x[0] < 0 else 2 * x for x in np.asarray(X)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


@pytest.mark.parametrize("output_attribute", ["data", "doubled"])
def test_none_outputs_become_samples_with_none_in_the_output_attribute(
    output_attribute,
):
    inputs = [Sample(np.array([v, 0.0]), key=str(i)) for i, v in enumerate([1, -1, 2])]
    inputs.insert(1, Sample(None, key="none"))
    out = SampleWrapper(
        NoneForNegatives(), output_attribute=output_attribute
    ).transform(inputs)
    assert [o.key for o in out] == ["0", "none", "1", "2"]
    values = [getattr(o, output_attribute) for o in out]
    assert values[1] is None and values[2] is None
    np.testing.assert_array_equal(values[0], [2.0, 0.0])
    np.testing.assert_array_equal(values[3], [4.0, 0.0])
    if output_attribute != "data":  # the input's data is kept beside it
        np.testing.assert_array_equal(out[2].data, inputs[2].data)
        assert out[1].data is None


def test_none_inputs_in_sample_sets_keep_the_sets_shape(samples):
    wrapper = SampleWrapper(StandardScaler()).fit(samples)
    broken = Sample(None, parent=samples[1])
    sets = [
        SampleSet([samples[0], broken, samples[2]], key="a"),
        SampleSet([Sample(None, key="only")], key="b"),
        samples[3],
    ]
    out = wrapper.transform(sets)
    assert [type(o) for o in out] == [SampleSet, SampleSet, Sample]
    assert [o.key for o in out] == ["a", "b", samples[3].key]
    assert [s.key for s in out[0]] == [samples[0].key, samples[1].key, samples[2].key]
    assert out[0][1].data is None and out[0][1].target == samples[1].target
    assert [s.data for s in out[1]] == [None] and out[1][0].key == "only"
    expected = wrapper.transform([samples[0], samples[2], samples[3]])
    np.testing.assert_allclose(out[0][2].data, expected[1].data)
    np.testing.assert_allclose(out[2].data, expected[2].data)


def test_predict_and_score_with_none_inputs(samples):
    wrapper = SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "target")])
    inputs = [*samples]
    inputs[4] = Sample(None, parent=samples[4])
    wrapper.fit(inputs)  # drops the None input
    valid = samples[:4] + samples[5:]
    reference = LogisticRegression().fit(data(valid), [s.target for s in valid])
    np.testing.assert_allclose(wrapper.estimator.coef_, reference.coef_)
    predicted = wrapper.predict(inputs)
    assert [p.key for p in predicted] == [s.key for s in samples]
    assert predicted[4].data is None
    assert [p.data for p in predicted[:4]] == list(reference.predict(data(samples[:4])))
    assert wrapper.score(inputs) == reference.score(
        data(valid), [s.target for s in valid]
    )


@pytest.mark.parametrize("method", ["fit", "score"])
def test_all_inputs_none_in_fit_or_score_is_a_clear_error(method):
    wrapper = SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "t")])
    wrapper.estimator.fit([[0.0], [1.0]], [0, 1])
    with pytest.raises(
        ValueError,
        match=re.escape(f"SampleWrapper.{method} got 2 samples whose 'data' is None"),
    ):
        getattr(wrapper, method)([Sample(None, t=0), Sample(None, t=1)])


def test_score_with_y_for_samples_is_a_type_error(samples):
    wrapper = SampleWrapper(LogisticRegression(), fit_extra_arguments=[("y", "target")])
    wrapper.fit(samples)
    with pytest.raises(TypeError, match=re.escape("SampleWrapper.score got y")):
        wrapper.score(samples, [s.target for s in samples])


def test_wrong_number_of_outputs_names_the_estimator(samples):
    with pytest.raises(RuntimeError, match="WrongLength.transform returned 19 outputs"):
        SampleWrapper(WrongLength()).transform(samples)


def test_output_attribute_returns_new_samples_and_never_mutates(samples):
    before = [repr(s) for s in samples]
    wrapper = SampleWrapper(StandardScaler(), output_attribute="scaled").fit(samples)
    out = wrapper.transform(samples)
    assert [repr(s) for s in samples] == before
    assert all(not hasattr(s, "scaled") for s in samples)
    assert out[0] is not samples[0]
    np.testing.assert_array_equal(out[0].data, samples[0].data)
    assert out[0].scaled.shape == samples[0].data.shape


def test_input_attribute(samples):
    inputs = [Sample(None, features=s.data, key=s.key) for s in samples]
    wrapper = SampleWrapper(StandardScaler(), input_attribute="features").fit(inputs)
    out = wrapper.transform(inputs)
    expected = StandardScaler().fit_transform(np.stack([s.data for s in samples]))
    np.testing.assert_allclose(np.stack([o.data for o in out]), expected)


def test_empty_input_returns_empty_list():
    assert SampleWrapper(StandardScaler()).transform([]) == []


def test_delayed_input_is_loaded_once_per_call():
    calls = []

    def loader(i):
        def load():
            calls.append(i)
            return np.full(2, float(i))

        return load

    inputs = [DelayedSample(loader(i), key=str(i), offset=1.0) for i in range(5)]
    wrapper = SampleWrapper(AddOffset(), [("offset", "offset")])
    wrapper.transform(inputs)
    assert sorted(calls) == list(range(5))
    calls.clear()
    SampleWrapper(StandardScaler()).fit(inputs)
    assert sorted(calls) == list(range(5))


def test_missing_attribute_names_sample_attribute_and_parameter(samples):
    broken = [*samples[:2], Sample(np.zeros(4), key="x")]
    wrapper = SampleWrapper(AddOffset(), [("offset", "offset")])
    msg = "attribute 'offset' of sample 2"
    with pytest.raises(AttributeError, match=re.escape(msg)) as info:
        wrapper.transform(broken)
    assert "transform_extra_arguments" in str(info.value)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"transform_extra_arguments": "offset"}, "transform_extra_arguments"),
        ({"fit_extra_arguments": [("y",)]}, "fit_extra_arguments"),
        ({"output_attribute": 3}, "output_attribute"),
    ],
)
def test_wrong_option_types_are_reported_with_their_name(samples, params, name):
    wrapper = SampleWrapper(StandardScaler(), **params)  # no error at construction
    with pytest.raises(TypeError, match=f"SampleWrapper got {name}="):
        wrapper.fit(samples)


def test_estimator_declared_defaults_and_precedence(samples):
    declared = SampleWrapper(DeclaresDefaults())
    out = declared.transform(samples)
    np.testing.assert_allclose(out[3].data, samples[3].data + samples[3].offset)
    # An explicit empty list wins over the declaration ...
    explicit = SampleWrapper(DeclaresDefaults(), transform_extra_arguments=[])
    with pytest.raises(TypeError, match="offset"):
        explicit.transform(samples)
    # ... and so does an explicit other value.
    other = SampleWrapper(DeclaresDefaults(), [("offset", "target")])
    np.testing.assert_allclose(
        other.transform(samples)[3].data, samples[3].data + samples[3].target
    )


def test_legacy_bob_tags_are_read(samples):
    class Legacy(AddOffset):
        def _more_tags(self):
            return {"bob_transform_extra_input": (("offset", "offset"),)}

    out = SampleWrapper(Legacy()).transform(samples)
    np.testing.assert_allclose(out[0].data, samples[0].data + samples[0].offset)


def test_clone_get_params_set_params():
    wrapper = SampleWrapper(PCA(n_components=2), fit_extra_arguments=[("y", "t")])
    params = wrapper.get_params(deep=True)
    assert params["estimator__n_components"] == 2
    assert params["fit_extra_arguments"] == [("y", "t")]
    wrapper.set_params(estimator__n_components=3)
    assert wrapper.estimator.n_components == 3
    cloned = clone(wrapper)
    assert cloned.estimator is not wrapper.estimator
    assert cloned.get_params(deep=True)["estimator__n_components"] == 3
