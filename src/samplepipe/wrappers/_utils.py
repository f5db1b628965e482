"""bob.pipelines' small public helpers: nested wrappers and flattened sample sets."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from sklearn.pipeline import Pipeline

from ._sample import SAMPLE_DATA_ATTRS, SampleSet


def getattr_nested(estimator: Any, name: str) -> Any:
    """``name`` of ``estimator``, else of the estimator it wraps, recursively.

    Parameters
    ----------
    estimator : object
        Usually a wrapper; its ``estimator`` attribute is followed.
    name : str
        The attribute to look up.

    Returns
    -------
    value : object
        The attribute of the outermost level that has it (even when its value
        is None), or None when no level has it.

    See Also
    --------
    is_instance_nested : Whether some level is of a given class.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from samplepipe import CheckpointWrapper, SampleWrapper, getattr_nested
    >>> est = CheckpointWrapper(SampleWrapper(PCA(n_components=2)), model_path="m")
    >>> getattr_nested(est, "n_components"), getattr_nested(est, "model_path")
    (2, 'm')
    >>> getattr_nested(est, "no_such_attribute") is None
    True
    """
    while True:
        if hasattr(estimator, name):
            return getattr(estimator, name)
        if not hasattr(estimator, "estimator"):
            return None
        estimator = estimator.estimator


def is_instance_nested(obj: Any, attribute: str, cls: type | tuple[type, ...]) -> bool:
    """Whether ``obj``, or an object reached through ``attribute``, is a ``cls``.

    Parameters
    ----------
    obj : object
        Where to start, e.g. a wrapped estimator.
    attribute : str
        The attribute followed repeatedly, e.g. ``"estimator"`` to look through
        wrapper layers.
    cls : type or tuple of type
        As for `isinstance`.

    Returns
    -------
    found : bool

    See Also
    --------
    is_pipeline_wrapped : The same for each step of a pipeline.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from samplepipe import (
    ...     CheckpointWrapper, DaskWrapper, SampleWrapper, is_instance_nested)
    >>> est = CheckpointWrapper(SampleWrapper(PCA()))
    >>> is_instance_nested(est, "estimator", SampleWrapper)
    True
    >>> is_instance_nested(est, "estimator", DaskWrapper)
    False
    """
    seen = set()
    while id(obj) not in seen:  # guards against a cycle of references
        if isinstance(obj, cls):
            return True
        seen.add(id(obj))
        if not hasattr(obj, attribute):
            return False
        obj = getattr(obj, attribute)
    return False


def is_pipeline_wrapped(pipeline: Pipeline, wrapper: type) -> list[bool]:
    """For each step of ``pipeline``, whether it is a ``wrapper`` at some level.

    Parameters
    ----------
    pipeline : Pipeline
    wrapper : type
        A wrapper class, e.g. `SampleWrapper`; looked for through the steps'
        ``estimator`` attributes (`is_instance_nested`).

    Returns
    -------
    wrapped : list of bool
        One boolean per step, in order. ``None`` and ``"passthrough"`` steps are
        skipped, as scikit-learn's `Pipeline` skips them.

    Raises
    ------
    ValueError
        If ``pipeline`` is not a `Pipeline`.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from samplepipe import SampleWrapper, is_pipeline_wrapped
    >>> pipeline = make_pipeline(SampleWrapper(StandardScaler()), PCA())
    >>> is_pipeline_wrapped(pipeline, SampleWrapper)
    [True, False]
    """
    if not isinstance(pipeline, Pipeline):
        msg = (
            f"is_pipeline_wrapped got {type(pipeline).__name__}; it expects a "
            "sklearn.pipeline.Pipeline (use is_instance_nested(estimator, "
            "'estimator', wrapper) for a single estimator)."
        )
        raise ValueError(msg)
    return [
        is_instance_nested(step, "estimator", wrapper)
        for _, step in pipeline.steps
        if step is not None and not (isinstance(step, str) and step == "passthrough")
    ]


def flatten_samplesets(samplesets: Iterable[SampleSet]) -> list[SampleSet]:
    """One sample set per sample, keyed ``"<set key>-<i>"``.

    Parameters
    ----------
    samplesets : iterable of SampleSet
        Each set needs a ``key``.

    Returns
    -------
    flat : list of SampleSet
        For every set and every sample ``i`` in it, a `SampleSet` holding only
        that sample, with a deep copy of the set's metadata and the key
        ``"<set key>-<i>"``. The samples themselves are not copied, and a
        delayed set is loaded once.

    Raises
    ------
    ValueError
        If a set has no ``key``.

    Examples
    --------
    >>> from samplepipe import Sample, SampleSet, flatten_samplesets
    >>> sets = [SampleSet([Sample(1), Sample(2)], key="s", subject="x")]
    >>> flatten_samplesets(sets)
    [SampleSet(samples=[Sample(data=1)], key='s-0', subject='x'),
     SampleSet(samples=[Sample(data=2)], key='s-1', subject='x')]
    """
    flat = []
    for n, sset in enumerate(samplesets):
        try:
            key = sset.key
        except AttributeError:
            msg = (
                f"flatten_samplesets got set {n} without a 'key' attribute "
                f"({sset!r}); give every set a key, e.g. SampleSet(samples, "
                "key='subject-1')."
            )
            raise ValueError(msg) from None
        metadata = {
            name: value
            for name, value in vars(sset).items()
            if not name.startswith("_") and name not in SAMPLE_DATA_ATTRS
        }
        for i, sample in enumerate(list(sset.samples)):
            copied = copy.deepcopy(metadata)
            copied["key"] = f"{key}-{i}"
            flat.append(SampleSet([sample], **copied))
    return flat
