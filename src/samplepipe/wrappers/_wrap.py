"""wrap(): wrap an estimator, or each step of a Pipeline, in several layers."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sklearn.pipeline import Pipeline

from ..storage.fs import join_location
from ..storage.keys import check_step_name


def _named_bases() -> dict[str, type]:
    from ._checkpoint import CheckpointWrapper
    from ._dask import DaskWrapper
    from ._sample_wrapper import SampleWrapper

    return {
        "sample": SampleWrapper,
        "checkpoint": CheckpointWrapper,
        "dask": DaskWrapper,
    }


def _resolve_bases(bases: Iterable[type | str]) -> list[type]:
    if isinstance(bases, str | type) or not hasattr(bases, "__iter__"):
        msg = (
            f"wrap got bases={bases!r}; it must be a list of classes and of the "
            "strings 'sample', 'checkpoint', 'dask'."
        )
        raise TypeError(msg)
    named = _named_bases()
    resolved: list[type] = []
    for base in bases:
        if isinstance(base, str):
            try:
                base = named[base.lower()]
            except KeyError:
                msg = (
                    f"wrap got unknown base {base!r}; use a class or one of "
                    f"{sorted(named)}."
                )
                raise ValueError(msg) from None
        if not isinstance(base, type):
            msg = f"wrap got base {base!r}; it must be a class or a string."
            raise TypeError(msg)
        resolved.append(base)
    return resolved


def _build(
    cls: type, kwargs: Mapping[str, Any], estimator: Any = None
) -> tuple[Any, set[str]]:
    """Instantiate ``cls`` with the kwargs it accepts; return it and their names."""
    names = set(cls._get_param_names()) if hasattr(cls, "_get_param_names") else set()
    used = {k: v for k, v in kwargs.items() if k in names and k != "estimator"}
    if estimator is None:
        return cls(**used), set(used)
    return cls(estimator, **used), set(used)


def _wrap_one(
    bases: Sequence[type],
    estimator: Any,
    kwargs: Mapping[str, Any],
    where: str = "wrap",
) -> Any:
    used: set[str] = set()
    if estimator is None:
        if not bases:
            msg = "wrap got no estimator and no bases to build one from."
            raise ValueError(msg)
        estimator, used = _build(bases[0], kwargs)
        bases = bases[1:]
    for cls in bases:
        estimator, names = _build(cls, kwargs, estimator)
        used |= names
    extra = sorted(set(kwargs) - used)
    if extra:
        msg = (
            f"{where} got extra kwargs that no layer accepts: {extra}; check their "
            "spelling or remove them."
        )
        raise ValueError(msg)
    return estimator


def wrap(bases: Iterable[type | str], estimator: Any = None, **kwargs: Any) -> Any:
    """Wrap ``estimator`` (or each step of a `Pipeline`) in several layers.

    Parameters
    ----------
    bases : iterable of class or str
        Wrappers from the inside out; the strings ``"sample"``, ``"checkpoint"``
        and ``"dask"`` (any case) stand for `SampleWrapper`, `CheckpointWrapper`
        and `DaskWrapper`. Without ``estimator``, the first class is built from
        ``kwargs`` and becomes the estimator.
    estimator : estimator or Pipeline, default=None
        What to wrap. For a `Pipeline`, each step is wrapped on its own, and a
        new pipeline is returned.
    **kwargs
        Passed to each class that has a parameter of that name. For a pipeline,
        step ``name`` checkpoints into ``features_dir/<name>/`` and
        ``model_path/<name>.pkl``: **model_path is then a folder**. With
        ``"dask"``, a `ToDaskBag` step (taking ``npartitions`` or
        ``partition_size``) is put first.

    Returns
    -------
    estimator : estimator or Pipeline
        The wrapped estimator. Neither ``bases`` nor ``estimator`` is changed.

    Raises
    ------
    ValueError
        When a kwarg is accepted by no layer (of any step, for a pipeline).

    Examples
    --------
    >>> from sklearn.preprocessing import StandardScaler
    >>> from samplepipe import wrap
    >>> wrap(["sample"], StandardScaler(), input_attribute="data")
    SampleWrapper(estimator=StandardScaler(), input_attribute='data')
    """
    bases = _resolve_bases(bases)
    if isinstance(estimator, Pipeline):
        return _wrap_pipeline(bases, estimator, kwargs)
    return _wrap_one(bases, estimator, kwargs)


def _wrap_pipeline(
    bases: Sequence[type], pipeline: Pipeline, kwargs: Mapping[str, Any]
) -> Pipeline:
    from ._dask import DaskWrapper, ToDaskBag

    kwargs = dict(kwargs)
    bag_kwargs = {
        k: kwargs.pop(k) for k in ("npartitions", "partition_size") if k in kwargs
    }
    uses_dask = DaskWrapper in bases
    if bag_kwargs and not uses_dask:
        msg = f"wrap got {sorted(bag_kwargs)}, which only apply with 'dask' in bases."
        raise ValueError(msg)
    steps: list[tuple[str, Any]] = []
    for name, step in pipeline.steps:
        check_step_name(name, owner="wrap's pipeline")
        if step is None or step == "passthrough" or isinstance(step, ToDaskBag):
            steps.append((name, step))
            continue
        step_kwargs = dict(kwargs)
        if step_kwargs.get("features_dir") is not None:
            step_kwargs["features_dir"] = join_location(
                os.fspath(step_kwargs["features_dir"]), name
            )
        if step_kwargs.get("model_path") is not None:
            step_kwargs["model_path"] = join_location(
                os.fspath(step_kwargs["model_path"]), f"{name}.pkl"
            )
        steps.append(
            (name, _wrap_one(bases, step, step_kwargs, where=f"wrap (step {name!r})"))
        )
    if uses_dask and not any(isinstance(s, ToDaskBag) for _, s in steps):
        steps.insert(0, ("ToDaskBag", ToDaskBag(**bag_kwargs)))
    params = pipeline.get_params(deep=False)
    params["steps"] = steps
    return type(pipeline)(**params)
