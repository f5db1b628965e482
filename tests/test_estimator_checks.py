"""Every wrapper is an ordinary scikit-learn estimator on plain arrays."""

import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from samplepipe import CheckpointWrapper, DaskWrapper, SampleWrapper, wrap

METHODS = [
    "transform",
    "fit_transform",
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
    "score",
    "score_samples",
]

INNER = [
    LogisticRegression(),
    LinearRegression(),
    StandardScaler(),
    PCA(),
    IsolationForest(),
    KMeans(),
    GaussianNB(),
    SVC(),  # predict_proba only with probability=True (available_if inside)
    SVC(probability=True),
]

LAYERS = {
    "sample": SampleWrapper,
    "checkpoint": CheckpointWrapper,
    "dask": DaskWrapper,
    "sample-checkpoint-dask": lambda est: wrap(["sample", "checkpoint", "dask"], est),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("inner", INNER, ids=repr)
@pytest.mark.parametrize("layer", LAYERS)
def test_hasattr_tells_the_truth(layer, inner, method):
    wrapper = LAYERS[layer](inner)
    assert hasattr(wrapper, method) == hasattr(inner, method)


# scikit-learn's own checks, on plain arrays: every wrapper passes them straight
# through to the estimator it wraps. Known gaps are listed with their reason.
_OVERWRITE = (
    "the wrapped estimator is fitted in place (as Pipeline does), so hashing the "
    "'estimator' parameter before and after fit differs"
)
_GAPS = {
    "check_estimators_overwrite_params": _OVERWRITE,
}


def _expected_failed_checks(estimator):
    return dict(_GAPS)


def _wrapped(est):
    return [
        SampleWrapper(est),
        CheckpointWrapper(SampleWrapper(est), features_dir=None, model_path=None),
        DaskWrapper(SampleWrapper(est)),
    ]


@parametrize_with_checks(
    [
        *_wrapped(LogisticRegression()),
        *_wrapped(LinearRegression()),
        *_wrapped(StandardScaler()),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
