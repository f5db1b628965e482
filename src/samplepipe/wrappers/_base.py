"""Helpers shared by the wrappers: option defaults, fit detection, names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import get_tags

# Library defaults of the options an estimator may declare for itself through
# ``__samplepipe_tags__``. Every wrapper parameter of the same name that is left
# at ``None`` takes the estimator's declaration, else this default.
DEFAULT_OPTIONS: dict[str, Any] = {
    "input_attribute": "data",
    "output_attribute": "data",
    "transform_extra_arguments": (),
    "fit_extra_arguments": (),
    "extension": ".h5",
    "save_func": None,
    "load_func": None,
    "checkpoint_features": True,
    "fit_supports_dask_array": False,
    "fit_supports_dask_bag": False,
    "version": None,
}

# bob.pipelines' tag names, still read from legacy ``_more_tags()`` dicts.
_LEGACY_TAGS: dict[str, str] = {
    "bob_input": "input_attribute",
    "bob_output": "output_attribute",
    "bob_transform_extra_input": "transform_extra_arguments",
    "bob_fit_extra_input": "fit_extra_arguments",
    "bob_checkpoint_extension": "extension",
    "bob_features_save_fn": "save_func",
    "bob_features_load_fn": "load_func",
    "bob_checkpoint_features": "checkpoint_features",
    "bob_fit_supports_dask_array": "fit_supports_dask_array",
    "bob_fit_supports_dask_bag": "fit_supports_dask_bag",
}


def estimator_options(estimator: Any) -> dict[str, Any]:
    """Option defaults that ``estimator`` declares for the wrappers around it.

    An estimator declares them with a method ``__samplepipe_tags__(self)`` that
    returns a dict whose keys are names of `DEFAULT_OPTIONS`. Wrappers forward the
    declaration of the estimator they wrap. bob.pipelines' ``_more_tags()`` keys
    (``bob_input`` ...) are read too.

    Parameters
    ----------
    estimator : object
        Usually a scikit-learn estimator or a samplepipe wrapper.

    Returns
    -------
    options : dict of str to object
        The declared options only (legacy tags first, overridden by
        ``__samplepipe_tags__``); empty when the estimator declares none.

    Raises
    ------
    ValueError
        If ``__samplepipe_tags__()`` returns a name that is not an option.

    Examples
    --------
    >>> from sklearn.base import BaseEstimator, TransformerMixin
    >>> class Scaler(TransformerMixin, BaseEstimator):
    ...     def __samplepipe_tags__(self):
    ...         return {"transform_extra_arguments": [("factor", "scale")]}
    >>> estimator_options(Scaler())
    {'transform_extra_arguments': [('factor', 'scale')]}
    """
    options: dict[str, Any] = {}
    more_tags = getattr(estimator, "_more_tags", None)
    if callable(more_tags):
        try:
            legacy = more_tags()
        except Exception:  # legacy hooks may call removed sklearn internals
            legacy = {}
        for name, option in _LEGACY_TAGS.items():
            if name in legacy:
                options[option] = legacy[name]
    declared = getattr(estimator, "__samplepipe_tags__", None)
    if callable(declared):
        tags = dict(declared())
        unknown = sorted(set(tags) - set(DEFAULT_OPTIONS))
        if unknown:
            msg = (
                f"{type(estimator).__name__}.__samplepipe_tags__() returned unknown "
                f"options {unknown}; known options are {sorted(DEFAULT_OPTIONS)}."
            )
            raise ValueError(msg)
        options.update(tags)
    return options


def resolve_option(wrapper: Any, name: str, value: Any = None) -> Any:
    """Explicit argument > estimator declaration > library default.

    ``None`` means "not given"; an explicit ``False`` or empty list wins.
    """
    if value is None:
        value = getattr(wrapper, name, None)
    if value is not None:
        return value
    declared = estimator_options(wrapper.estimator)
    if name in declared:
        return declared[name]
    return DEFAULT_OPTIONS[name]


def inner_estimators(estimator: Any) -> Iterator[Any]:
    """Yield ``estimator`` and every estimator wrapped inside it, outside in."""
    while estimator is not None:
        yield estimator
        estimator = getattr(estimator, "estimator", None)
        if not isinstance(estimator, BaseEstimator):
            return


def estimator_requires_fit(estimator: Any) -> bool:
    """Whether ``estimator`` must be fitted before it transforms.

    Looks through samplepipe wrappers and the steps of a `Pipeline` (any step
    that needs fitting makes the pipeline need it). ``FunctionTransformer`` and
    estimators whose scikit-learn ``requires_fit`` tag is False do not.

    Parameters
    ----------
    estimator : object
        An estimator, a samplepipe wrapper or a `Pipeline`.

    Returns
    -------
    requires_fit : bool
        True also for objects that are not scikit-learn estimators.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from samplepipe import SampleWrapper
    >>> estimator_requires_fit(SampleWrapper(PCA()))
    True
    >>> estimator_requires_fit(FunctionTransformer())
    False
    """
    if isinstance(estimator, Pipeline):
        return any(
            estimator_requires_fit(step)
            for _, step in estimator.steps
            if step is not None and step != "passthrough"
        )
    if getattr(estimator, "_is_samplepipe_wrapper", False):
        return estimator_requires_fit(estimator.estimator)
    if isinstance(estimator, FunctionTransformer):
        return False
    more_tags = getattr(estimator, "_more_tags", None)
    if callable(more_tags):
        try:
            legacy = more_tags()
        except Exception:
            legacy = {}
        if "requires_fit" in legacy:
            return bool(legacy["requires_fit"])
    try:
        return bool(get_tags(estimator).requires_fit)
    except Exception:  # not a scikit-learn estimator: assume it must be fitted
        return True


def short_name(estimator: Any, width: int | None = 30) -> str:
    """``Sample|Checkpoint|MyTransformer``: the wrappers and the estimator."""
    parts = []
    for est in inner_estimators(estimator):
        name = type(est).__name__
        if getattr(est, "_is_samplepipe_wrapper", False):
            name = name.removesuffix("Wrapper")
        parts.append(name)
    return "|".join(parts)[:width]
