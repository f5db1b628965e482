"""UseMethod: an estimator whose ``transform`` is another method of the one it wraps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import Tags, get_tags

from ._base import estimator_requires_fit

if TYPE_CHECKING:
    from typing_extensions import Self

PREDICTION_METHODS = (
    "transform",
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
    "score_samples",
)


def available_methods(estimator: Any) -> list[str]:
    """The prediction methods ``estimator`` (through its wrappers) has."""
    return [m for m in PREDICTION_METHODS if hasattr(estimator, m)]


class UseMethod(TransformerMixin, BaseEstimator):
    """Expose ``estimator.<method>`` as ``transform``, to checkpoint predictions.

    ``CheckpointWrapper(SampleWrapper(UseMethod(clf, "predict_proba")))``
    checkpoints each sample's class probabilities like any transformed sample.
    The flows build it for their ``method=`` argument.

    Parameters
    ----------
    estimator : estimator object
        A fitted (or fittable) scikit-learn estimator.
    method : str, default="predict"
        One of ``predict``, ``predict_proba``, ``predict_log_proba``,
        ``decision_function``, ``score_samples`` or ``transform``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> X, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1])
    >>> UseMethod(LogisticRegression(), "predict").fit(X, y).transform(X)
    array([0, 0, 1, 1])
    """

    def __init__(self, estimator: Any, method: str = "predict") -> None:
        self.estimator = estimator
        self.method = method

    def _check(self) -> None:
        if self.method not in PREDICTION_METHODS:
            msg = (
                f"UseMethod got method={self.method!r}; use one of "
                f"{list(PREDICTION_METHODS)}."
            )
            raise ValueError(msg)
        if not hasattr(self.estimator, self.method):
            msg = (
                f"{type(self.estimator).__name__} has no method {self.method!r}; it "
                f"has {available_methods(self.estimator)}."
            )
            raise AttributeError(msg)

    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> Self:
        """Fit the wrapped estimator."""
        self._check()
        self.estimator.fit(X, y, **fit_params)
        return self

    def transform(self, X: Any) -> Any:
        """``estimator.<method>(X)``."""
        self._check()
        return getattr(self.estimator, self.method)(X)

    def __sklearn_is_fitted__(self) -> bool:
        from sklearn.utils.validation import _is_fitted

        return not estimator_requires_fit(self.estimator) or _is_fitted(self.estimator)

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.requires_fit = get_tags(self.estimator).requires_fit
        return tags
