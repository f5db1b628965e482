"""A demo pipeline and sample factories over scikit-learn's bundled digits.

Everything here is importable by path for deployments, e.g.
``"samplepipe.examples:demo_pipeline"`` and ``"samplepipe.examples:digits_samples"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ._factory import factory
from .wrappers import Sample

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from typing_extensions import Self

N_TRAIN = 1200


class ClassifierScores(TransformerMixin, BaseEstimator):
    """A logistic regression whose ``transform`` gives class probabilities.

    It declares ``fit_extra_arguments=[("y", "target")]`` through
    ``__samplepipe_tags__``, so samples feed their ``target`` to ``fit``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000) -> None:
        self.C = C
        self.max_iter = max_iter

    def __samplepipe_tags__(self) -> dict[str, Any]:
        return {"fit_extra_arguments": [("y", "target")]}

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        self.classifier_ = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self.classifier_.fit(X, y)
        self.classes_ = self.classifier_.classes_
        return self

    def transform(self, X: ArrayLike) -> np.ndarray:
        return self.classifier_.predict_proba(X)


@factory
def demo_pipeline(n_components: int = 16, C: float = 1.0) -> Pipeline:
    """Scaling -> PCA -> a classifier's class probabilities."""
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("pca", PCA(n_components=n_components, random_state=0)),
            ("scores", ClassifierScores(C=C)),
        ]
    )


@factory
def digits_samples(
    subset: Literal["all", "train", "test"] = "all", n: int | None = None
) -> list[Sample]:
    """Samples of the digits data set (bundled with scikit-learn, no download).

    Parameters
    ----------
    subset : {"all", "train", "test"}, default="all"
        ``train`` is the first 1,200 images, ``test`` the other 597.
    n : int, default=None
        Keep only the first ``n``.

    Returns
    -------
    list of Sample
        ``data`` is the 64 pixel values, keys are like ``digits/00042``, and
        ``target`` is the digit.

    Examples
    --------
    >>> digits_samples("train", n=2)[1]
    Sample(data=array([ 0.,  0.,  0., 12., ...]), key='digits/00001', target=1)
    """
    from sklearn.datasets import load_digits

    if subset not in ("all", "train", "test"):
        msg = f"subset must be 'all', 'train' or 'test', got {subset!r}."
        raise ValueError(msg)
    digits = load_digits()
    indices = np.arange(len(digits.target))
    if subset == "train":
        indices = indices[:N_TRAIN]
    elif subset == "test":
        indices = indices[N_TRAIN:]
    if n is not None:
        indices = indices[:n]
    return [
        Sample(digits.data[i], key=f"digits/{i:05d}", target=int(digits.target[i]))
        for i in indices
    ]
