"""DaskWrapper and ToDaskBag: the same pipelines on Dask bags."""

from __future__ import annotations

from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.metaestimators import available_if

from ._base import estimator_requires_fit, inner_estimators, resolve_option
from ._checkpoint import _update_estimator
from ._sample import SampleBatch, iter_samples
from ._sample_wrapper import BaseWrapper, _estimator_has


class ToDaskBag(TransformerMixin, BaseEstimator):
    """Turn a list of samples into a `dask.bag.Bag`.

    Parameters
    ----------
    npartitions : int, default=None
        Number of partitions; default: Dask's choice (``partition_size`` wins).
    partition_size : int, default=None
        Samples per partition.
    """

    def __init__(self, npartitions=None, partition_size=None):
        self.npartitions = npartitions
        self.partition_size = partition_size

    def fit(self, X, y=None):
        """Nothing to fit."""
        return self

    def transform(self, X):
        """A bag over ``X``."""
        import dask.bag

        if hasattr(X, "__dask_graph__"):
            return X
        if self.partition_size is not None:
            return dask.bag.from_sequence(X, partition_size=self.partition_size)
        if self.npartitions is not None:
            return dask.bag.from_sequence(X, npartitions=self.npartitions)
        return dask.bag.from_sequence(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags


def _call_partition(partition, estimator, method):
    return getattr(estimator, method)(list(partition))


def _fit_partitions(estimator, *partitions):
    samples = [s for part in partitions for s in part]
    return estimator.fit(samples)


def _fit_arrays(estimator, X, y=None):
    if y is None:
        return estimator.fit(X)
    return estimator.fit(X, y=y)


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
        Fit on a Dask array of the samples' data (for dask-ml estimators).
    fit_supports_dask_bag : bool, default=None
        Fit on bags of `SampleBatch` (X and each extra fit argument).

    Notes
    -----
    ``transform`` (and ``predict``, ...) return a lazy bag. ``fit`` runs one
    task that fits on the whole training set (scikit-learn estimators need it in
    one place) unless the estimator fits on Dask collections, then copies the
    fitted state back into the local estimator, so that later transforms ship
    it to the workers. A valid model checkpoint of any `CheckpointWrapper`
    inside is loaded instead of fitting.

    Resource tags are Dask annotations on the graph layers. Dask Bag's graph
    optimisation fuses tasks and drops annotations, so compute tagged graphs
    with ``optimize_graph=False``, e.g.
    ``pipeline.transform(samples).compute(scheduler=client, optimize_graph=False)``.
    """

    def __init__(
        self,
        estimator,
        fit_tag=None,
        transform_tag=None,
        fit_supports_dask_array=None,
        fit_supports_dask_bag=None,
    ):
        self.estimator = estimator
        self.fit_tag = fit_tag
        self.transform_tag = transform_tag
        self.fit_supports_dask_array = fit_supports_dask_array
        self.fit_supports_dask_bag = fit_supports_dask_bag

    def _annotate(self, tag):
        import contextlib

        import dask

        if tag is None:
            return contextlib.nullcontext()
        return dask.annotate(resources={tag: 1})

    def _map(self, method, bag):
        import dask

        if not hasattr(bag, "map_partitions"):
            msg = (
                f"DaskWrapper.{method} expects a dask bag; put a ToDaskBag step first "
                "(wrap(['dask'], pipeline) does that)."
            )
            raise TypeError(msg)
        estimator = dask.delayed(self.estimator, pure=True)
        with self._annotate(self.transform_tag):
            result = bag.map_partitions(
                _call_partition,
                estimator,
                method,
                token=f"{self._name()}.{method}",
            )
        return result

    def _load_checkpointed_model(self):
        for est in inner_estimators(self.estimator):
            load = getattr(est, "load_model", None)
            if callable(load) and getattr(est, "model_path", None) is not None:
                if not getattr(est, "force", False) and load():
                    return True
        return False

    def fit(self, X, y=None, **fit_params):
        """Fit on a bag of samples; load a valid model checkpoint instead.

        Returns
        -------
        self : DaskWrapper
        """
        import dask

        if not estimator_requires_fit(self.estimator):
            return self
        if self._load_checkpointed_model():
            return self
        if not hasattr(X, "__dask_graph__"):
            self.estimator.fit(X, y, **fit_params)
            return self
        estimator = dask.delayed(self.estimator, pure=True)
        with self._annotate(self.fit_tag):
            if resolve_option(self, "fit_supports_dask_array"):
                # dask-aware estimators (dask-ml) take the lazy arrays themselves
                X_array, y_array = self._arrays(X)
                _fit_arrays(self.estimator, X_array, y_array)
                return self
            if resolve_option(self, "fit_supports_dask_bag"):
                args = self._batch_bags(X)
                self.estimator.fit(args.pop("X"), **args)
                return self
            parts = X.to_delayed()
            fitted = dask.delayed(_fit_partitions)(estimator, *parts)
            try:
                fitted = fitted.compute()
            except Exception as exc:
                msg = f"DaskWrapper could not fit {self._name()}: {exc}"
                raise RuntimeError(msg) from exc
        _update_estimator(self.estimator, fitted)
        return self

    def _arrays(self, bag):
        """Dask arrays X (and y) from a bag of samples, one chunk per partition."""
        import dask
        import dask.array as da
        import numpy as np

        attribute = getattr(self.estimator, "input_attribute", None) or "data"
        pairs = (
            resolve_option(self.estimator, "fit_extra_arguments")
            if hasattr(self.estimator, "fit_extra_arguments")
            else ()
        )
        for keyword, _ in pairs:
            if keyword != "y":
                msg = (
                    "DaskWrapper with fit_supports_dask_array passes only 'y' from "
                    f"fit_extra_arguments, got {keyword!r}."
                )
                raise NotImplementedError(msg)
        y_attribute = dict(pairs).get("y")

        def stack_x(part):
            return np.vstack(
                [np.atleast_1d(getattr(s, attribute)) for s in iter_samples(part)]
            )

        def stack_y(part):
            return np.asarray([getattr(s, y_attribute) for s in iter_samples(part)])

        parts = bag.to_delayed()
        X = da.concatenate(
            [
                da.from_delayed(
                    dask.delayed(stack_x)(p), shape=(np.nan, np.nan), dtype=float
                )
                for p in parts
            ],
            allow_unknown_chunksizes=True,
        )
        y = None
        if y_attribute is not None:
            y = da.concatenate(
                [
                    da.from_delayed(
                        dask.delayed(stack_y)(p), shape=(np.nan,), dtype=object
                    )
                    for p in parts
                ],
                allow_unknown_chunksizes=True,
            )
        return X, y

    def _batch_bags(self, bag):
        attribute = getattr(self.estimator, "input_attribute", None) or "data"
        args = {"X": bag.map_partitions(lambda p: [SampleBatch(list(p), attribute)])}
        for keyword, attr in getattr(self.estimator, "fit_extra_arguments", None) or ():
            args[keyword] = bag.map_partitions(
                lambda p, a=attr: [SampleBatch(list(p), a)]
            )
        return args

    @available_if(_estimator_has("transform"))
    def transform(self, X):
        """A lazy bag of transformed samples."""
        return self._map("transform", X)

    @available_if(_estimator_has("transform"))
    def fit_transform(self, X, y=None, **fit_params):
        """Fit, then transform lazily."""
        return self.fit(X, y, **fit_params).transform(X)

    @available_if(_estimator_has("predict"))
    def predict(self, X):
        """A lazy bag of predictions."""
        return self._map("predict", X)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X):
        """A lazy bag of class probabilities."""
        return self._map("predict_proba", X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        """A lazy bag of decision function values."""
        return self._map("decision_function", X)

    @available_if(_estimator_has("score"))
    def score(self, X):
        """A lazy bag of scores, one per partition."""
        return self._map("score", X)


def dask_tags(estimator):
    """Resource tags of every `DaskWrapper` in ``estimator`` (or its steps).

    Returns a dict ``{"<step>.fit" | "<step>.transform": {tag: 1}}``. The tags
    are attached to the graph as Dask annotations when the graph is built, so the
    distributed scheduler honours them without extra arguments; this dict tells
    which resources the workers must offer.
    """
    tags = {}
    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            if isinstance(step, BaseEstimator):
                tags.update(dask_tags(step))
        return tags
    for est in inner_estimators(estimator):
        if isinstance(est, DaskWrapper):
            name = est._name()
            if est.fit_tag is not None:
                tags[f"{name}.fit"] = {est.fit_tag: 1}
            if est.transform_tag is not None:
                tags[f"{name}.transform"] = {est.transform_tag: 1}
    return tags
