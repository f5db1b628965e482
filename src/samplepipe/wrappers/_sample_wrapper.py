"""SampleWrapper: feed samples and their metadata to any scikit-learn estimator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin
from sklearn.utils import Tags, get_tags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import _is_fitted

from ._base import estimator_requires_fit, resolve_option, short_name
from ._sample import DelayedSample, Sample, SampleSet, is_sample_list, stack_values

if TYPE_CHECKING:
    from typing_extensions import Self


def _estimator_has(attr: str) -> Callable[[Any], bool]:
    """available_if check: the wrapped estimator has ``attr``."""

    def check(self: Any) -> bool:
        getattr(self.estimator, attr)
        return True

    return check


class BaseWrapper(MetaEstimatorMixin, BaseEstimator):
    """Behaviour shared by samplepipe's wrappers (tags, fitted state)."""

    _is_samplepipe_wrapper = True

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        inner = get_tags(self.estimator)
        tags.estimator_type = inner.estimator_type
        tags.target_tags = inner.target_tags
        tags.transformer_tags = inner.transformer_tags
        tags.classifier_tags = inner.classifier_tags
        tags.regressor_tags = inner.regressor_tags
        tags.input_tags = inner.input_tags
        tags.requires_fit = inner.requires_fit
        tags.non_deterministic = inner.non_deterministic
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        if not estimator_requires_fit(self.estimator):
            return True
        return _is_fitted(self.estimator)

    def __samplepipe_tags__(self) -> dict[str, Any]:
        from ._base import estimator_options

        return estimator_options(self.estimator)

    @property
    def classes_(self) -> np.ndarray:
        """Classes of the wrapped classifier."""
        return self.estimator.classes_

    @property
    def n_features_in_(self) -> int:
        """Number of features seen by the wrapped estimator during fit."""
        return self.estimator.n_features_in_

    @property
    def feature_names_in_(self) -> np.ndarray:
        """Feature names seen by the wrapped estimator during fit."""
        return self.estimator.feature_names_in_

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        return super().__repr__(N_CHAR_MAX)

    def _name(self) -> str:
        return short_name(self)


class SampleWrapper(BaseWrapper):
    """Wrap a scikit-learn estimator so that it takes samples with metadata.

    Parameters
    ----------
    estimator : estimator object
        Any scikit-learn estimator.
    transform_extra_arguments : list of (str, str), default=None
        ``(keyword, sample_attribute)`` pairs: for each pair, the list of that
        attribute over the samples is passed to ``transform`` (and ``predict``,
        ``decision_function``, ``predict_proba``) as ``keyword``.
    fit_extra_arguments : list of (str, str), default=None
        The same for ``fit`` and ``score``, e.g. ``[("y", "target")]``.
    output_attribute : str, default=None
        Where the outputs go. With ``"data"`` (the default) each output is a new
        sample that copies the input's metadata; otherwise a new sample that
        keeps the input's data and gains this attribute. Inputs are never changed.
    input_attribute : str, default=None
        Which attribute of the samples is the estimator's ``X`` (default
        ``"data"``).

    Notes
    -----
    Each option left at ``None`` takes the value the estimator declares through
    ``__samplepipe_tags__()`` (see `samplepipe.estimator_options`), else the
    library default. Explicit ``False`` or ``[]`` wins over both.

    Failed samples stay in line (as in bob.pipelines): an input whose ``X`` is
    ``None`` is not given to the estimator, and comes out at its position as a
    new sample that keeps all its metadata (``key`` ...) with the output
    attribute set to ``None``; so does an input for which the estimator returned
    ``None``. Outputs always line up with the inputs, also inside sample sets.
    ``fit`` and ``score`` leave such inputs out. Plain arrays (not samples) pass
    straight through to the estimator, so the wrapper is also an ordinary
    scikit-learn estimator.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.preprocessing import StandardScaler
    >>> from samplepipe import Sample, SampleWrapper
    >>> samples = [Sample(np.array([float(i)]), key=str(i)) for i in range(3)]
    >>> scaler = SampleWrapper(StandardScaler()).fit(samples)
    >>> scaler.transform(samples)[2]
    Sample(data=array([1.22474487]), key='2')
    >>> scaler.transform([Sample(None, key="failed")])
    [Sample(data=None, key='failed')]
    """

    def __init__(
        self,
        estimator: Any,
        transform_extra_arguments: Sequence[tuple[str, str]] | None = None,
        fit_extra_arguments: Sequence[tuple[str, str]] | None = None,
        output_attribute: str | None = None,
        input_attribute: str | None = None,
    ) -> None:
        self.estimator = estimator
        self.transform_extra_arguments = transform_extra_arguments
        self.fit_extra_arguments = fit_extra_arguments
        self.output_attribute = output_attribute
        self.input_attribute = input_attribute

    # -- option checks -----------------------------------------------------
    def _option(self, name: str) -> Any:
        value = resolve_option(self, name)
        if name.endswith("_attribute") and not isinstance(value, str):
            msg = (
                f"SampleWrapper got {name}={value!r}; it must be the name of a "
                "sample attribute (a str)."
            )
            raise TypeError(msg)
        if name.endswith("_extra_arguments"):
            ok = isinstance(value, list | tuple) and all(
                isinstance(p, list | tuple)
                and len(p) == 2
                and all(isinstance(s, str) for s in p)
                for p in value
            )
            if not ok:
                msg = (
                    f"SampleWrapper got {name}={value!r}; it must be a list of "
                    "(keyword, sample_attribute) pairs of strings, e.g. "
                    "[('y', 'target')]."
                )
                raise TypeError(msg)
        return value

    def _extra_kwargs(
        self, option: str, samples: Sequence[Sample], indices: Iterable[int]
    ) -> dict[str, list[Any]]:
        pairs = self._option(option)
        kwargs: dict[str, list[Any]] = {}
        for keyword, attribute in pairs:
            values = []
            for i in indices:
                try:
                    values.append(getattr(samples[i], attribute))
                except AttributeError as exc:
                    msg = (
                        f"SampleWrapper({type(self.estimator).__name__}) could not "
                        f"read attribute {attribute!r} of sample {i} "
                        f"({samples[i]!r}), named in {option}=[({keyword!r}, "
                        f"{attribute!r})]; give every sample that attribute or "
                        f"change {option}."
                    )
                    raise AttributeError(msg) from exc
            kwargs[keyword] = values
        return kwargs

    def _inputs(self, samples: Sequence[Sample]) -> tuple[Any, list[int]]:
        """``(X, valid)``: the stacked inputs that are not None, their indices.

        Each sample's input is loaded once and copied into ``X`` before the
        next is loaded (see `stack_values`).
        """
        attribute = self._option("input_attribute")
        valid: list[int] = []

        def loaded() -> Iterator[Any]:
            for i, s in enumerate(samples):
                try:
                    value = getattr(s, attribute)
                except AttributeError as exc:
                    msg = (
                        f"SampleWrapper({type(self.estimator).__name__}) could not "
                        f"read attribute {attribute!r} of sample {i} ({s!r}), named "
                        "in input_attribute."
                    )
                    raise AttributeError(msg) from exc
                if value is not None:
                    valid.append(i)
                    yield value

        X = stack_values(loaded(), n=len(samples))
        return X, valid

    def _valid_inputs(
        self, method: str, flat: Sequence[Sample]
    ) -> tuple[np.ndarray | list[Any], list[int]]:
        """Stacked ``X`` of the inputs that are not None, and their indices."""
        X, valid = self._inputs(flat)
        if not valid:
            attribute = self._option("input_attribute")
            msg = (
                f"SampleWrapper.{method} got {len(flat)} samples whose "
                f"{attribute!r} is None and no other; {method} needs at least one "
                "sample with data."
            )
            raise ValueError(msg)
        return X, valid

    # -- the core: one estimator call for a whole list of samples -----------
    def _apply(
        self, method: str, samples: Iterable[Sample | SampleSet]
    ) -> list[Sample | SampleSet]:
        flat, sets = _flatten(samples)
        outputs = self._call_flat(method, flat)
        return _unflatten(outputs, sets)

    def _call_flat(self, method: str, flat: Sequence[Sample]) -> list[Sample]:
        if not flat:
            return []
        results = self._values(method, flat)
        # A None result (an invalid input, or the estimator's None) keeps its
        # place as a sample whose output attribute is None.
        attribute = self._option("output_attribute")
        return [_make_output(s, attribute, r) for s, r in zip(flat, results)]

    def _values(self, method: str, flat: Sequence[Sample]) -> list[Any]:
        """What each output sample of ``method`` would carry, without the samples.

        The value `_call_flat` puts in each output's ``output_attribute``
        (None for an invalid input); `CheckpointWrapper` keeps only these.
        """
        X, valid = self._inputs(flat)
        results = [None] * len(flat)
        if valid:
            kwargs = self._extra_kwargs("transform_extra_arguments", flat, valid)
            out = getattr(self.estimator, method)(X, **kwargs)
            del X  # before the outputs are written: one copy of the batch less
            if len(out) != len(valid):
                msg = (
                    f"{type(self.estimator).__name__}.{method} returned {len(out)} "
                    f"outputs for {len(valid)} inputs; it must return one output "
                    "per input sample."
                )
                raise RuntimeError(msg)
            for j, i in enumerate(valid):
                results[i] = out[j]
        return results

    # -- scikit-learn API --------------------------------------------------
    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> Self:
        """Fit the estimator on samples (or on plain arrays).

        Parameters
        ----------
        X : list of Sample or SampleSet, or array-like
            Samples whose input attribute is None are left out.
        y : array-like, default=None
            Must be None for samples: targets come from ``fit_extra_arguments``
            (for arrays, it is passed on).
        **fit_params : dict
            Passed to the estimator's ``fit``.

        Returns
        -------
        self : SampleWrapper

        Raises
        ------
        TypeError
            If ``y`` is given with samples.
        ValueError
            If every sample's input attribute is None.
        """
        if not is_sample_list(X):
            # plain arrays, or Dask collections prepared by DaskWrapper
            if not estimator_requires_fit(self.estimator):
                return self
            self.estimator.fit(X, y, **fit_params)
            return self
        if y is not None:
            msg = (
                "SampleWrapper.fit got y; with samples, targets come from sample "
                "attributes: pass fit_extra_arguments=[('y', '<attribute>')] instead."
            )
            raise TypeError(msg)
        self._option("output_attribute")
        self._option("transform_extra_arguments")
        if not estimator_requires_fit(self.estimator):
            return self
        flat, _ = _flatten(X)
        X, valid = self._valid_inputs("fit", flat)
        kwargs = self._extra_kwargs("fit_extra_arguments", flat, valid)
        self.estimator.fit(X, **kwargs, **fit_params)
        return self

    def _dispatch(self, method: str, X: Any, **kwargs: Any) -> Any:
        if is_sample_list(X) or (isinstance(X, list | tuple) and len(X) == 0):
            return self._apply(method, X)
        return getattr(self.estimator, method)(X, **kwargs)

    @available_if(_estimator_has("transform"))
    def transform(self, X: Any, **kwargs: Any) -> Any:
        """Transform samples; returns new samples in the same structure."""
        return self._dispatch("transform", X, **kwargs)

    @available_if(_estimator_has("transform"))
    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        """Fit, then transform the same samples."""
        return self.fit(X, y, **fit_params).transform(X)

    @available_if(_estimator_has("predict"))
    def predict(self, X: Any, **kwargs: Any) -> Any:
        """Predictions as new samples (or an array for plain input)."""
        return self._dispatch("predict", X, **kwargs)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X: Any, **kwargs: Any) -> Any:
        """Class probabilities as new samples (or an array for plain input)."""
        return self._dispatch("predict_proba", X, **kwargs)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X: Any, **kwargs: Any) -> Any:
        """Log class probabilities as new samples (or an array)."""
        return self._dispatch("predict_log_proba", X, **kwargs)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X: Any, **kwargs: Any) -> Any:
        """Decision function as new samples (or an array for plain input)."""
        return self._dispatch("decision_function", X, **kwargs)

    @available_if(_estimator_has("score_samples"))
    def score_samples(self, X: Any, **kwargs: Any) -> Any:
        """Per-sample scores as new samples (or an array for plain input)."""
        return self._dispatch("score_samples", X, **kwargs)

    @available_if(_estimator_has("score"))
    def score(self, X: Any, y: Any = None, **kwargs: Any) -> float:
        """Score on samples, with targets from ``fit_extra_arguments``.

        Parameters
        ----------
        X : list of Sample or SampleSet, or array-like
            Samples whose input attribute is None are left out, as in `fit`.
        y : array-like, default=None
            Must be None for samples: targets come from ``fit_extra_arguments``
            (for arrays, it is passed on).
        **kwargs : dict
            Passed to the estimator's ``score`` for arrays; must be empty for
            samples.

        Returns
        -------
        score : float
            The estimator's ``score`` over all valid samples at once.
        """
        if not is_sample_list(X):
            return self.estimator.score(X, y, **kwargs)
        if y is not None or kwargs:
            given = ["y"] * (y is not None) + sorted(kwargs)
            msg = (
                f"SampleWrapper.score got {', '.join(given)}; with samples, targets "
                "and weights come from sample attributes: pass "
                "fit_extra_arguments=[('y', '<attribute>'), ...] instead."
            )
            raise TypeError(msg)
        flat, _ = _flatten(X)
        X, valid = self._valid_inputs("score", flat)
        extra = self._extra_kwargs("fit_extra_arguments", flat, valid)
        return self.estimator.score(X, **extra)


def _flatten(
    samples: Iterable[Sample | SampleSet],
) -> tuple[list[Sample], list[tuple[SampleSet | None, int, int]]]:
    """Flatten sample sets; return the samples and how to regroup them."""
    flat: list[Sample] = []
    sets: list[tuple[SampleSet | None, int, int]] = []
    for s in samples:
        if isinstance(s, SampleSet):
            members = list(s.samples)
            sets.append((s, len(flat), len(members)))
            flat.extend(members)
        else:
            sets.append((None, len(flat), 1))
            flat.append(s)
    return flat, sets


def _unflatten(
    outputs: Sequence[Sample], sets: Iterable[tuple[SampleSet | None, int, int]]
) -> list[Sample | SampleSet]:
    result: list[Sample | SampleSet] = []
    for parent, start, n in sets:
        if parent is None:
            result.append(outputs[start])
        else:
            result.append(SampleSet(outputs[start : start + n], parent=parent))
    return result


def _make_output(sample: Sample, attribute: str, value: Any) -> Sample:
    """A new sample carrying ``value`` in ``attribute``; ``sample`` is unchanged.

    ``value`` may be None: a failed sample keeps its place and its metadata.
    """
    if attribute == "data":
        return Sample(value, parent=sample)
    if isinstance(sample, DelayedSample):
        return DelayedSample(sample._load, parent=sample, **{attribute: value})
    return Sample(sample.data, parent=sample, **{attribute: value})
