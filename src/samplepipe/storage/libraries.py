"""Installed library code or user code, and what kind of object the identity meets.

`library_version` tells code of an installed library (a module under
``site-packages`` or the standard library, or built in), which counts by its
distribution and version, from user code (scripts, notebooks, an editable
install), which counts by its content. The predicates below sort the objects
that code reaches: functions and classes, small plain constants, objects of
user classes, estimators, and library objects that wrap user code.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import functools
import os
import pathlib
import re
import sys
import sysconfig
import threading
import types
from collections.abc import Mapping
from typing import Any

import numpy as np


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        import site

        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except (AttributeError, ImportError):  # pragma: no cover - embedded Pythons
        pass
    real = {os.path.realpath(r) for r in roots if r}
    return tuple(sorted(r.rstrip(os.sep) + os.sep for r in real))


_ROOTS = _library_roots()
_module_cache: dict[str, str | None] = {}
_module_lock = threading.Lock()
_distributions: Any = None  # importlib.metadata.packages_distributions(), once


_STDLIB = tuple(
    os.path.realpath(p).rstrip(os.sep) + os.sep
    for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib")}
    if p
)


def _in_stdlib(module: Any) -> bool:
    """A module of the standard library (not of a site-packages below it)."""
    path = getattr(module, "__file__", None)
    if not path:
        return False
    real = os.path.realpath(path)
    return real.startswith(_STDLIB) and f"{os.sep}site-packages{os.sep}" not in real


def _top_level_version(top: str) -> str:
    global _distributions
    module = sys.modules.get(top)
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return f"{top}=={version}"
    if _in_stdlib(module):  # what the lookup below gives, without scanning
        return f"{top}==python-{sys.version_info[0]}"
    from importlib import metadata

    if _distributions is None:
        _distributions = metadata.packages_distributions()
    names = _distributions.get(top) or []
    for name in names:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:  # pragma: no cover
            continue
    return f"{top}==python-{sys.version_info[0]}"


def library_version(module_name: str | None) -> str | None:
    """``"dist==version"`` when ``module_name`` is installed library code, else None.

    A module counts as a library when it is built in or its file lies under
    ``site-packages`` or the standard library. Code of a script, a notebook,
    the current folder or an editable install is user code (None).
    """
    if not module_name:
        return None
    with _module_lock:
        if module_name in _module_cache:
            return _module_cache[module_name]
    module = sys.modules.get(module_name)
    top = module_name.split(".", 1)[0]
    if module_name == "__main__" or module is None:
        result = None
    elif module_name in sys.builtin_module_names or top in ("builtins", "_io"):
        result = f"python-{sys.version_info[0]}"
    else:
        path = getattr(module, "__file__", None)
        if path is None:
            # namespace packages, frozen modules: a library if its top is one
            top_module = sys.modules.get(top)
            path = getattr(top_module, "__file__", None)
        if path is None:
            result = None
        else:
            real = os.path.realpath(path)
            if real.startswith(_ROOTS):
                result = _top_level_version(top)
            else:
                result = None
    with _module_lock:
        _module_cache[module_name] = result
    return result


# ---------------------------------------------------------------------------
# what kind of object: code, plain data, a user object
# ---------------------------------------------------------------------------
def _is_function_like(obj: Any) -> bool:
    return isinstance(
        obj,
        types.FunctionType
        | types.BuiltinFunctionType
        | types.MethodType
        | functools.partial,
    )


# what a descriptor (functools.cached_property, singledispatchmethod, ...) holds
_DESCRIPTOR_FIELDS = ("fn", "func", "fget", "check", "__wrapped__", "dispatcher")


# how deep `_is_constant` looks into containers (a dispatch table of tables)
_MAX_DEPTH = 8


# small values of the standard library and numpy: hashed by their content
_LIBRARY_VALUES = (
    np.generic,
    np.dtype,
    decimal.Decimal,
    fractions.Fraction,
    pathlib.PurePath,
    re.Pattern,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    types.SimpleNamespace,
    enum.Enum,
)


# where library objects keep the user function they wrap
_WRAPPER_FIELDS = ("__wrapped__", "__func__", "func", "fn", "pyfunc", "function")


def _wrapped_code(value: Any) -> list[Any]:
    """The user functions a library object wraps (``__wrapped__``, ``func``, ...)."""
    if not callable(value) or isinstance(value, type):
        return []
    found = []
    for name in _WRAPPER_FIELDS:
        try:
            inner = getattr(value, name, None)
        except Exception:  # noqa: BLE001 - a __getattr__ that raises
            continue
        if inner is not None and inner is not value and callable(inner):
            found.append(inner)
    return found


def _is_descriptor_with_function(obj: Any) -> bool:
    return hasattr(type(obj), "__get__") and any(
        callable(getattr(obj, f, None)) for f in _DESCRIPTOR_FIELDS
    )


def _is_constant(
    value: Any, depth: int = 0, follow: frozenset[str] = frozenset()
) -> bool:
    """Module-level values a function may read: small plain data.

    With ``"containers"`` in ``follow``, the data may hold code too: a dict,
    list or tuple of functions and classes (a dispatch table), user modules
    and, with ``"instances"``, objects of user classes.
    """
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return True
    if isinstance(value, _LIBRARY_VALUES):
        return True
    if depth > 0 and "containers" in follow:
        if _is_function_like(value) or isinstance(value, type):
            return True
        if isinstance(value, types.ModuleType) and _is_user_module(value):
            return True
        if "instances" in follow and _is_user_object(value):
            return True
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, tuple | frozenset | list | set) and len(value) <= 1000:
        return all(_is_constant(v, depth + 1, follow) for v in value)
    if _is_plain_mapping(value) and len(value) <= 1000:
        return all(
            _is_constant(k, depth + 1, follow) and _is_constant(v, depth + 1, follow)
            for k, v in value.items()
        )
    return isinstance(value, np.ndarray) and value.size <= 10_000


def _is_plain_mapping(value: Any) -> bool:
    """A dict (or subclass), a mapping proxy, or a mapping of a user class.

    Not a library's live mapping such as ``os.environ``.
    """
    if isinstance(value, dict | types.MappingProxyType):
        return True
    if not isinstance(value, Mapping):
        return False
    module = getattr(type(value), "__module__", None)
    return library_version(module if isinstance(module, str) else None) is None


def _is_user_module(module: Any) -> bool:
    """A module of the user's own code (not installed, not the standard library)."""
    return (
        isinstance(module, types.ModuleType)
        and library_version(module.__name__) is None
    )


def _is_user_object(value: Any) -> bool:
    """An instance of a user class (or an estimator) that code may read."""
    if isinstance(value, type | types.ModuleType) or _is_function_like(value):
        return False
    if _is_estimator(value):
        return True
    module = getattr(type(value), "__module__", None)
    return library_version(module if isinstance(module, str) else None) is None


def _type_name(cls: Any) -> str:
    return str(getattr(cls, "__qualname__", None) or repr(cls))


def _is_estimator(obj: Any) -> bool:
    if isinstance(obj, type):
        return False
    try:  # a __getattr__ may raise anything (a dict as attributes, a proxy)
        return callable(getattr(obj, "get_params", None)) and hasattr(obj, "__dict__")
    except Exception:  # noqa: BLE001
        return False
