"""Registries of named classes (formats, layouts), as joblib's store backends."""

from __future__ import annotations

from collections.abc import Container, MutableMapping
from typing import Any


def register(
    registry: MutableMapping[str, type],
    built_in: Container[str],
    kind: str,
    base: type,
    name: Any,
    cls: Any,
) -> None:
    """Register ``cls`` (a subclass of ``base``) under ``name`` in ``registry``.

    ``kind`` names the registry in messages (``"format"``: they come from
    ``register_format``). Registering a name again replaces its class, except
    a built-in one.
    """
    caller = f"register_{kind}"
    if (
        not isinstance(name, str)
        or not name
        or not all(c.isalnum() or c in "_-." for c in name)
    ):
        msg = (
            f"{caller} got name={name!r}; it must be a non-empty str of "
            "letters, digits, '_', '-' or '.'."
        )
        raise ValueError(msg)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        msg = (
            f"{caller} got cls={cls!r} for {name!r}; it must be a subclass "
            f"of samplepipe.storage.{base.__name__}."
        )
        raise TypeError(msg)
    if name in built_in and name in registry and registry[name] is not cls:
        msg = f"{caller} cannot replace the built-in {kind} {name!r}."
        raise ValueError(msg)
    registry[name] = cls
