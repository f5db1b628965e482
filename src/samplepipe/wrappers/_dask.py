"""DaskWrapper and ToDaskBag: the same pipelines on Dask bags."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.utils import Tags
from sklearn.utils.metaestimators import available_if

from ..storage.models import update_estimator
from ._base import estimator_requires_fit, inner_estimators, resolve_option, short_name
from ._sample import Sample, SampleBatch, SampleSet, is_sample_list, iter_samples
from ._sample_wrapper import BaseWrapper, SampleWrapper, _estimator_has

if TYPE_CHECKING:
    import dask.array
    import dask.bag
    from dask.delayed import Delayed
    from typing_extensions import Self


class ToDaskBag(TransformerMixin, BaseEstimator):
    """Turn a list of samples into a `dask.bag.Bag`.

    Parameters
    ----------
    npartitions : int, default=None
        Number of partitions; default: Dask's choice (``partition_size`` wins).
    partition_size : int, default=None
        Samples per partition.
    """

    def __init__(
        self, npartitions: int | None = None, partition_size: int | None = None
    ) -> None:
        self.npartitions = npartitions
        self.partition_size = partition_size

    def fit(self, X: Any, y: Any = None) -> Self:
        """Nothing to fit."""
        return self

    def transform(self, X: Any) -> dask.bag.Bag:
        """A bag over ``X``, a list of samples.

        ``X`` that is already a Dask collection (normally a bag) is returned as is.
        """
        import dask.bag

        if hasattr(X, "__dask_graph__"):
            return X
        if self.partition_size is not None:
            return dask.bag.from_sequence(X, partition_size=self.partition_size)
        if self.npartitions is not None:
            return dask.bag.from_sequence(X, npartitions=self.npartitions)
        return dask.bag.from_sequence(X)

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


def _is_bag(X: object) -> TypeGuard[dask.bag.Bag]:
    if not hasattr(X, "__dask_graph__"):
        return False
    import dask.bag

    return isinstance(X, dask.bag.Bag)


def _call_partition(partition: Iterable[Any], estimator: Any, method: str) -> Any:
    return getattr(estimator, method)(list(partition))


def _fit_partitions(estimator: Any, *partitions: Iterable[Any]) -> Any:
    samples = [s for part in partitions for s in part]
    return estimator.fit(samples)


def _fit_arrays(estimator: Any, X: Any, y: Any = None) -> Any:
    if y is None:
        return estimator.fit(X)
    return estimator.fit(X, y=y)


def _stack_partition(
    partition: Iterable[Sample | SampleSet], attribute: str, y_attribute: str | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(X, y)`` arrays of one partition; samples whose input is None are left out.

    Scalars become vectors of length 1; ``(None, None)`` for no valid sample.
    """
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    for s in iter_samples(partition):
        value = getattr(s, attribute)
        if value is None:
            continue
        xs.append(np.atleast_1d(value))
        if y_attribute is not None:
            ys.append(getattr(s, y_attribute))
    if not xs:
        return None, None
    return np.stack(xs), (np.asarray(ys) if y_attribute is not None else None)


def _shape_dtype(
    array: np.ndarray | None,
) -> tuple[tuple[int, ...], np.dtype] | None:
    return None if array is None else (array.shape, array.dtype)


def _sample_options(estimator: Any) -> tuple[str, Sequence[tuple[str, str]]]:
    """``input_attribute`` and ``fit_extra_arguments`` of the SampleWrapper inside."""
    for est in inner_estimators(estimator):
        if isinstance(est, SampleWrapper):
            return est._option("input_attribute"), est._option("fit_extra_arguments")
    return "data", ()


class DaskWrapper(BaseWrapper):
    """Run a sample-aware estimator on Dask bags, partition by partition.

    Parameters
    ----------
    estimator : estimator object
        Usually a `SampleWrapper` or `CheckpointWrapper`.
    fit_tag, transform_tag : str, default=None
        A worker resource (e.g. ``"GPU"``) that fit or transform tasks need one
        unit of; start workers with ``--resources GPU=1``.
    fit_supports_dask_array : bool, default=None
        Fit on a Dask array of the samples' data (for dask-ml estimators), and
        a Dask array ``y`` when ``fit_extra_arguments`` names ``"y"``.
    fit_supports_dask_bag : bool, default=None
        Fit on bags of `SampleBatch` (X and each extra fit argument).

    Notes
    -----
    ``transform`` (and ``predict``, ...) return a lazy bag for a bag.
    ``fit`` runs one task that fits on the whole training set (scikit-learn
    estimators need it in one place) unless the estimator fits on Dask
    collections, then copies the fitted state back into the local estimator, so
    that later transforms ship it to the workers. A `CheckpointWrapper` inside
    decides in that task whether its model checkpoint fits these training
    samples (then it loads the model instead of fitting); samples loaded from
    checkpoints are lazy, so this reads no data.

    With ``fit_supports_dask_array``, the training arrays are persisted on the
    workers first (one pass over the data; they must fit in the cluster's
    memory) so that the arrays given to ``fit`` have known chunk sizes and the
    samples' own dtype, as dask-ml estimators need. Samples whose input is None
    are left out, as `SampleWrapper.fit` does.

    Input that is not a Dask bag (arrays, Dask arrays) goes straight to the
    wrapped estimator, so the wrapper is also an ordinary scikit-learn
    estimator. A list of samples is fitted on locally by ``fit``, but given to
    ``transform``, ``predict`` ... it raises `TypeError`: it means a pipeline
    without its `ToDaskBag` step, whose results would not be lazy.

    Resource tags are Dask annotations on the graph layers. Dask Bag's graph
    optimisation fuses tasks and drops annotations, so compute tagged graphs
    with ``optimize_graph=False``, e.g.
    ``pipeline.transform(samples).compute(scheduler=client, optimize_graph=False)``.
    """

    def __init__(
        self,
        estimator: Any,
        fit_tag: str | None = None,
        transform_tag: str | None = None,
        fit_supports_dask_array: bool | None = None,
        fit_supports_dask_bag: bool | None = None,
    ) -> None:
        self.estimator = estimator
        self.fit_tag = fit_tag
        self.transform_tag = transform_tag
        self.fit_supports_dask_array = fit_supports_dask_array
        self.fit_supports_dask_bag = fit_supports_dask_bag

    def _annotate(self, tag: str | None) -> AbstractContextManager[None]:
        import contextlib

        import dask

        if tag is None:
            return contextlib.nullcontext()
        return dask.annotate(resources={tag: 1})

    def _run(self, method: str, X: Any, *args: Any, **kwargs: Any) -> Any:
        """A lazy bag for a bag; the estimator's own answer for other input."""
        if _is_bag(X):
            if any(a is not None for a in args) or kwargs:
                msg = (
                    f"DaskWrapper.{method} got extra arguments with a bag; with "
                    "samples, they come from sample attributes "
                    "(fit_extra_arguments, transform_extra_arguments)."
                )
                raise TypeError(msg)
            return self._map(method, X)
        if is_sample_list(X):
            msg = (
                f"DaskWrapper.{method} expects a dask bag of samples, got a "
                f"{type(X).__name__} of samples; put a ToDaskBag step first "
                "(wrap(['dask'], pipeline) does that)."
            )
            raise TypeError(msg)
        return getattr(self.estimator, method)(X, *args, **kwargs)

    def _map(self, method: str, bag: dask.bag.Bag) -> dask.bag.Bag:
        import dask

        estimator = dask.delayed(self.estimator, pure=True)
        with self._annotate(self.transform_tag):
            result = bag.map_partitions(
                _call_partition,
                estimator,
                method,
                token=f"{self._name()}.{method}",
            )
        return result

    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> Self:
        """Fit on a bag of samples (or pass plain input to the estimator).

        Parameters
        ----------
        X : dask.bag.Bag of Sample, or array-like
        y : array-like, default=None
            Must be None for a bag: targets come from ``fit_extra_arguments``
            (for other input, it is passed on).
        **fit_params : dict
            Passed to the estimator's ``fit``; must be empty for a bag.

        Returns
        -------
        self : DaskWrapper
        """
        import dask

        if not estimator_requires_fit(self.estimator):
            return self
        if not _is_bag(X):
            self.estimator.fit(X, y, **fit_params)
            return self
        if y is not None or fit_params:
            msg = (
                "DaskWrapper.fit got y or fit parameters with a bag of samples; "
                "targets come from sample attributes: pass "
                "fit_extra_arguments=[('y', '<attribute>')] to the SampleWrapper."
            )
            raise TypeError(msg)
        if resolve_option(self, "fit_supports_dask_array"):
            # dask-aware estimators (dask-ml) take the lazy arrays themselves
            X_array, y_array = self._arrays(X)
            with self._annotate(self.fit_tag):
                _fit_arrays(self.estimator, X_array, y_array)
            return self
        if resolve_option(self, "fit_supports_dask_bag"):
            with self._annotate(self.fit_tag):
                args = self._batch_bags(X)
                self.estimator.fit(args.pop("X"), **args)
            return self
        # One task fits on all the samples. A CheckpointWrapper inside checks
        # there whether its model checkpoint was fitted on these samples.
        estimator = dask.delayed(self.estimator, pure=True)
        with self._annotate(self.fit_tag):
            fitted = dask.delayed(_fit_partitions)(estimator, *X.to_delayed())
            try:
                fitted = fitted.compute()
            except Exception as exc:
                msg = f"DaskWrapper could not fit {self._name()}: {exc}"
                raise RuntimeError(msg) from exc
        update_estimator(self.estimator, fitted)
        return self

    def _arrays(
        self, bag: dask.bag.Bag
    ) -> tuple[dask.array.Array, dask.array.Array | None]:
        """Dask arrays X (and y) of a bag of samples, with known chunk sizes.

        The partitions are stacked and persisted (one pass over the data), then
        a light pass reads each stacked partition's shape and dtype.
        """
        import dask
        import dask.array as da

        attribute, pairs = _sample_options(self.estimator)
        for keyword, _ in pairs:
            if keyword != "y":
                msg = (
                    "DaskWrapper with fit_supports_dask_array passes only 'y' from "
                    f"fit_extra_arguments, got {keyword!r}."
                )
                raise NotImplementedError(msg)
        y_attribute = dict(pairs).get("y")
        stacked = [
            dask.delayed(_stack_partition, nout=2, pure=True)(p, attribute, y_attribute)
            for p in bag.to_delayed()
        ]
        xs = [x for x, _ in stacked]
        ys = [y for _, y in stacked] if y_attribute is not None else []
        persisted = dask.persist(*xs, *ys)
        xs, ys = persisted[: len(xs)], persisted[len(xs) :]
        metas = dask.compute(*(dask.delayed(_shape_dtype)(a) for a in (*xs, *ys)))
        x_metas, y_metas = metas[: len(xs)], metas[len(xs) :]
        keep = [i for i, m in enumerate(x_metas) if m is not None]
        if not keep:
            msg = (
                f"DaskWrapper could not fit {self._name()}: no sample of the bag "
                f"has a value in {attribute!r}."
            )
            raise ValueError(msg)
        shapes = {x_metas[i][0][1:] for i in keep}
        if len(shapes) > 1:
            msg = (
                f"DaskWrapper with fit_supports_dask_array got samples of different "
                f"shapes {sorted(shapes)} in {attribute!r}; all must have one shape."
            )
            raise ValueError(msg)

        def concatenate(
            parts: Sequence[Delayed], part_metas: Sequence[Any]
        ) -> dask.array.Array:
            return da.concatenate(
                [
                    da.from_delayed(
                        parts[i], shape=part_metas[i][0], dtype=part_metas[i][1]
                    )
                    for i in keep
                ]
            )

        X = concatenate(xs, x_metas)
        y = concatenate(ys, y_metas) if y_attribute is not None else None
        return X, y

    def _batch_bags(self, bag: dask.bag.Bag) -> dict[str, dask.bag.Bag]:
        attribute, pairs = _sample_options(self.estimator)
        args = {"X": bag.map_partitions(lambda p: [SampleBatch(list(p), attribute)])}
        for keyword, attr in pairs:
            args[keyword] = bag.map_partitions(
                lambda p, a=attr: [SampleBatch(list(p), a)]
            )
        return args

    @available_if(_estimator_has("transform"))
    def transform(self, X: Any) -> Any:
        """A lazy bag of transformed samples (plain input: the estimator's)."""
        return self._run("transform", X)

    @available_if(_estimator_has("transform"))
    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        """Fit, then transform (lazily for a bag)."""
        return self.fit(X, y, **fit_params).transform(X)

    @available_if(_estimator_has("predict"))
    def predict(self, X: Any) -> Any:
        """A lazy bag of predictions (plain input: the estimator's)."""
        return self._run("predict", X)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X: Any) -> Any:
        """A lazy bag of class probabilities (plain input: the estimator's)."""
        return self._run("predict_proba", X)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X: Any) -> Any:
        """A lazy bag of log class probabilities (plain input: the estimator's)."""
        return self._run("predict_log_proba", X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X: Any) -> Any:
        """A lazy bag of decision function values (plain input: the estimator's)."""
        return self._run("decision_function", X)

    @available_if(_estimator_has("score_samples"))
    def score_samples(self, X: Any) -> Any:
        """A lazy bag of per-sample scores (plain input: the estimator's)."""
        return self._run("score_samples", X)

    @available_if(_estimator_has("score"))
    def score(self, X: Any, y: Any = None, **kwargs: Any) -> Any:
        """A lazy bag of one score per partition (plain input: the estimator's).

        For a bag, targets come from ``fit_extra_arguments``; ``y`` must be None.
        """
        return self._run("score", X, y, **kwargs)


def dask_tags(estimator: BaseEstimator) -> dict[str, dict[str, int]]:
    """Resource tags of every `DaskWrapper` in ``estimator`` (or its steps).

    Returns
    -------
    tags : dict
        ``{"<name>.fit" | "<name>.transform": {tag: 1}}``. In a `Pipeline`,
        ``<name>`` is the step's name (``"pca.transform"``), with the names of
        nested pipelines joined by dots (``"features.pca.fit"``), so two steps
        of one class keep their own tags. For an estimator that is not a
        pipeline, ``<name>`` is its layers as in log messages, uncut
        (``"Dask|Sample|PCA.fit"``).

    Notes
    -----
    The tags are attached to the graph as Dask annotations when the graph is
    built, so the distributed scheduler honours them without extra arguments;
    this dict tells which resources the workers must offer.

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sklearn.pipeline import Pipeline
    >>> from samplepipe import DaskWrapper, SampleWrapper, dask_tags
    >>> pipeline = Pipeline([
    ...     ("gpu", DaskWrapper(SampleWrapper(PCA()), transform_tag="GPU")),
    ...     ("cpu", DaskWrapper(SampleWrapper(PCA()), transform_tag="CPU")),
    ... ])
    >>> dask_tags(pipeline)
    {'gpu.transform': {'GPU': 1}, 'cpu.transform': {'CPU': 1}}
    """
    return _dask_tags(estimator, None)


def _dask_tags(estimator: Any, prefix: str | None) -> dict[str, dict[str, int]]:
    tags: dict[str, dict[str, int]] = {}
    if isinstance(estimator, Pipeline):
        for name, step in estimator.steps:
            if isinstance(step, BaseEstimator):
                tags.update(
                    _dask_tags(step, name if prefix is None else f"{prefix}.{name}")
                )
        return tags
    for est in inner_estimators(estimator):
        if isinstance(est, Pipeline):
            tags.update(_dask_tags(est, prefix))
        elif isinstance(est, DaskWrapper):
            name = short_name(est, width=None) if prefix is None else prefix
            if est.fit_tag is not None:
                tags.setdefault(f"{name}.fit", {est.fit_tag: 1})
            if est.transform_tag is not None:
                tags.setdefault(f"{name}.transform", {est.transform_tag: 1})
    return tags
