"""Marking the functions that flows and deployments may call by import path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__samplepipe_factory__"


def factory(fn: F) -> F:
    """Allow ``fn`` to be named by import path as a pipeline or samples factory.

    Flow and deployment parameters such as ``pipeline="mymodule:make_pipeline"``
    (with ``pipeline_kwargs``) call the function they name. Whoever may start a
    run may choose those parameters, so samplepipe only calls functions marked
    with this decorator: ``pipeline="subprocess:getoutput"`` is refused. Naming a
    module still imports it, which runs its top-level code.

    Examples
    --------
    >>> import samplepipe
    >>> @samplepipe.factory
    ... def make_samples(n=3):
    ...     return [samplepipe.Sample(i, key=str(i)) for i in range(n)]
    >>> samplepipe.is_factory(make_samples)
    True
    """
    setattr(fn, _MARK, True)
    return fn


def is_factory(obj: Any) -> bool:
    """Whether ``obj`` was marked with `factory`."""
    return getattr(obj, _MARK, False) is True
