"""What makes a checkpoint: the identity of code, parameters, fitted state and inputs.

Everything here is deterministic across processes and module paths: the same
class run as ``__main__.X`` in a script and imported as ``mymodule.X`` has the
same identity, and so do two fits whose fitted state comes out the same.

* `code_identity` stands for the code of a class or callable: for code of an
  installed library (a module under ``site-packages`` or the standard library)
  its distribution and version; for any other code (scripts, notebooks, an
  editable install) its compiled code, the defaults and closure values, and the
  user functions, classes and constants it names as globals, recursively.
* `estimator_identity` adds an estimator's parameters, recursively.
* `state_digest` hashes fitted state: arrays by their bytes, objects by their
  class's code identity and their attributes. Pickle bytes are never hashed.
* `value_digest` is the fast content digest of one sample's data.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import threading
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 2

_DIGEST_SIZE = 16


def _blake(data: bytes = b"") -> Any:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE)


# ---------------------------------------------------------------------------
# installed code: distribution and version
# ---------------------------------------------------------------------------
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
_STDLIB_ROOTS = tuple(
    sorted(
        {
            os.path.realpath(r).rstrip(os.sep) + os.sep
            for r in (sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"))
            if r
        }
    )
)
_SITE_DIRS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


def _in_stdlib(real: str) -> bool:
    """Whether a module file is part of the standard library (not site-packages)."""
    return real.startswith(_STDLIB_ROOTS) and not any(d in real for d in _SITE_DIRS)


_module_cache: dict[str, str | None] = {}
_module_lock = threading.Lock()
_distributions: Any = None  # importlib.metadata.packages_distributions(), once


def _top_level_version(top: str) -> str:
    global _distributions
    module = sys.modules.get(top)
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return f"{top}=={version}"
    from importlib import metadata

    if _distributions is None:
        _distributions = metadata.packages_distributions()
    names = _distributions.get(top) or []
    for name in names:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:  # pragma: no cover
            continue
    return f"{top}==python-{sys.version_info[0]}.{sys.version_info[1]}"


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
        result = f"python-{sys.version_info[0]}.{sys.version_info[1]}"
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
            if _in_stdlib(real):
                # what _top_level_version gives, without scanning every
                # installed distribution (a third of a second, once)
                result = f"{top}==python-{sys.version_info[0]}.{sys.version_info[1]}"
            elif real.startswith(_ROOTS):
                result = _top_level_version(top)
            else:
                result = None
    with _module_lock:
        _module_cache[module_name] = result
    return result


# ---------------------------------------------------------------------------
# code identity
# ---------------------------------------------------------------------------
_code_cache: dict[types.CodeType, tuple[str, tuple[str, ...]]] = {}


def _code_digest(code: types.CodeType) -> tuple[str, tuple[str, ...]]:
    """Digest of a code object and the global names it (and nested code) reads.

    Line numbers, file names and the module are left out, so moving a function
    or importing it under another module name keeps its identity.
    """
    cached = _code_cache.get(code)
    if cached is not None:
        return cached
    h = _blake(b"code")
    names: list[str] = list(code.co_names)
    h.update(code.co_code)
    h.update(repr((code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    h.update("\0".join(code.co_names).encode("utf-8", "surrogatepass"))
    h.update("\0".join(code.co_varnames).encode("utf-8", "surrogatepass"))
    h.update("\0".join(code.co_freevars).encode("utf-8", "surrogatepass"))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest, inner = _code_digest(const)
            h.update(digest.encode())
            names.extend(inner)
        else:
            h.update(type(const).__name__.encode())
            h.update(repr(const).encode("utf-8", "surrogatepass"))
    result = (h.hexdigest(), tuple(dict.fromkeys(names)))
    _code_cache[code] = result
    return result


class _Hasher:
    """Feeds a structure into one BLAKE2b digest, deterministically.

    Code of user classes and functions goes in by `code_identity` rules;
    library objects by name and version; arrays by their bytes. Cycles are
    cut by remembering what is being hashed.
    """

    def __init__(self, fitted: bool = True) -> None:
        self.fitted = fitted
        self.h = _blake()
        self.active: set[int] = set()
        self.done_code: dict[int, str] = {}

    def tag(self, text: str) -> None:
        self.h.update(text.encode("utf-8", "surrogatepass"))
        self.h.update(b"\0")

    def hexdigest(self) -> str:
        return self.h.hexdigest()

    # -- values ------------------------------------------------------------
    def value(self, obj: Any) -> None:  # noqa: C901 - one dispatch table
        if obj is None or isinstance(obj, bool):
            self.tag(repr(obj))
            return
        if isinstance(obj, int | float | complex) and type(obj) in (
            int,
            float,
            complex,
        ):
            self.tag(f"{type(obj).__name__}:{obj!r}")
            return
        if type(obj) is str:
            self.tag("str")
            self.tag(obj)
            return
        if isinstance(obj, bytes | bytearray):
            self.tag(f"{type(obj).__name__}:{len(obj)}")
            self.h.update(obj)
            return
        if isinstance(obj, np.ndarray):
            self.array(obj)
            return
        if isinstance(obj, np.generic):
            self.array(np.asarray(obj))
            self.tag("generic")
            return
        key = id(obj)
        if key in self.active:
            self.tag("<cycle>")
            return
        self.active.add(key)
        try:
            self._container_or_object(obj)
        finally:
            self.active.discard(key)

    def _container_or_object(self, obj: Any) -> None:
        if type(obj) in (list, tuple):
            self.tag(f"{type(obj).__name__}:{len(obj)}")
            for item in obj:
                self.value(item)
            return
        if type(obj) is dict:
            self.tag(f"dict:{len(obj)}")
            for k, v in sorted(obj.items(), key=lambda kv: _sort_key(kv[0])):
                self.value(k)
                self.value(v)
            return
        if type(obj) in (set, frozenset):
            self.tag(f"{type(obj).__name__}:{len(obj)}")
            for digest in sorted(state_digest(item) for item in obj):
                self.tag(digest)
            return
        if isinstance(obj, type) or _is_function_like(obj):
            self.code(obj)
            return
        if _is_estimator(obj):
            self.estimator(obj)
            return
        self.instance(obj)

    def array(self, a: np.ndarray) -> None:
        self.tag(f"ndarray:{a.dtype.str}:{a.shape}")
        if a.dtype.hasobject:
            for item in a.ravel(order="C"):
                self.value(item)
        else:
            self.h.update(np.ascontiguousarray(a).view(np.uint8).data)

    def estimator(self, est: Any) -> None:
        """Class code, parameters and fitted state of an estimator."""
        self.tag("estimator")
        self.code(type(est))
        declared = _declared_version(est)
        if declared is not None:
            self.tag(f"version={declared}")
        params = est.get_params(deep=False)
        self.tag(f"params:{len(params)}")
        for name in sorted(params):
            self.tag(name)
            self.value(params[name])
        if not self.fitted:
            return
        state = _fitted_attributes(est)
        self.tag(f"fitted:{len(state)}")
        for name in sorted(state):
            self.tag(name)
            self.value(state[name])

    def instance(self, obj: Any) -> None:
        """Any other object: its class's identity and its attributes."""
        cls = type(obj)
        self.tag("instance")
        self.code(cls)
        library = library_version(getattr(cls, "__module__", None))
        state = None
        if hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
            state = dict(vars(obj))
        slots = [
            s
            for c in cls.__mro__
            for s in getattr(c, "__slots__", ())
            if s != "__dict__"
        ]
        if slots:
            state = dict(state or {})
            for s in slots:
                if hasattr(obj, s):
                    state[f"slot:{s}"] = getattr(obj, s)
        if isinstance(obj, types.ModuleType):
            self.tag(f"module:{obj.__name__}:{library}")
            return
        if state is None or (library is not None and not state):
            # library objects without instance state: name and version are enough
            try:
                import joblib

                self.tag(joblib.hash(obj))
            except Exception:  # noqa: BLE001 - unpicklable: fall back to its repr
                self.tag(repr(obj))
            return
        self.value(state)

    # -- code --------------------------------------------------------------
    def code(self, obj: Any) -> None:
        key = id(obj)
        known = self.done_code.get(key)
        if known is not None:
            self.tag(known)
            return
        self.done_code[key] = f"<code {getattr(obj, '__qualname__', '?')}>"
        self._code(obj)

    def _code(self, obj: Any) -> None:  # noqa: C901 - one dispatch table
        if isinstance(obj, functools.partial):
            self.tag("partial")
            self.code(obj.func)
            self.value(obj.args)
            self.value(dict(obj.keywords))
            return
        if isinstance(obj, staticmethod | classmethod):
            self.code(obj.__func__)
            return
        if isinstance(obj, property):
            self.tag("property")
            for f in (obj.fget, obj.fset, obj.fdel):
                self.code(f) if f is not None else self.tag("-")
            return
        if isinstance(obj, types.MethodType):
            self.tag("method")
            self.code(obj.__func__)
            self.value(obj.__self__)
            return
        module = getattr(obj, "__module__", None)
        qualname = str(
            getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "?")
        )
        library = library_version(module if isinstance(module, str) else None)
        if library is not None:
            self.tag(f"library:{module}.{qualname}:{library}")
            return
        if isinstance(obj, type):
            self._class(obj, qualname)
            return
        if isinstance(obj, types.FunctionType):
            self._function(obj, qualname)
            return
        if isinstance(obj, types.BuiltinFunctionType | types.BuiltinMethodType):
            self.tag(f"builtin:{module}.{qualname}")
            return
        if callable(obj):  # a callable instance of a user class
            self.instance(obj)
            return
        self.value(obj)

    def _class(self, cls: type, qualname: str) -> None:
        self.tag(f"class:{qualname}")
        for base in cls.__mro__[1:]:
            if base is object:
                continue
            self.code(base)
        for name, attr in sorted(vars(cls).items()):
            if name in _IGNORED_CLASS_ATTRIBUTES or name.startswith("_abc_"):
                continue
            self.tag(name)
            if _is_function_like(attr) or isinstance(
                attr, staticmethod | classmethod | property | type
            ):
                self.code(attr)
            elif _is_descriptor_with_function(attr):
                self.tag(type(attr).__qualname__)
                for field in ("fn", "func", "fget", "check", "__wrapped__"):
                    inner = getattr(attr, field, None)
                    if inner is not None and callable(inner):
                        self.code(inner)
            elif _is_constant(attr):
                self.value(attr)
            else:  # mutable class state (caches, registries): its type only
                self.tag(type(attr).__qualname__)

    def _function(self, fn: types.FunctionType, qualname: str) -> None:
        digest, names = _code_digest(fn.__code__)
        self.tag(f"function:{qualname}:{digest}")
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        if fn.__closure__:
            for cell in fn.__closure__:
                try:
                    self.value(cell.cell_contents)
                except ValueError:  # empty cell
                    self.tag("<empty>")
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            self.code(wrapped)
        module_globals = fn.__globals__
        for name in names:
            if name not in module_globals:
                continue
            value = module_globals[name]
            if isinstance(value, types.ModuleType):
                continue  # the module's own code comes in through what is used
            if _is_function_like(value) or isinstance(value, type):
                self.tag(f"global:{name}")
                self.code(value)
            elif _is_constant(value):
                self.tag(f"global:{name}")
                self.value(value)


_IGNORED_CLASS_ATTRIBUTES = {
    "__dict__",
    "__weakref__",
    "__module__",
    "__doc__",
    "__qualname__",
    "__annotations__",
    "__firstlineno__",
    "__static_attributes__",
    "__abstractmethods__",
    "_abc_impl",
    "__parameters__",
    "__orig_bases__",
    "__slotnames__",  # added by copyreg the first time an instance is pickled
    "__signature__",
}


def _sort_key(k: Any) -> tuple[str, str]:
    return (type(k).__name__, repr(k))


def _is_function_like(obj: Any) -> bool:
    return isinstance(
        obj,
        types.FunctionType
        | types.BuiltinFunctionType
        | types.MethodType
        | functools.partial,
    )


def _is_descriptor_with_function(obj: Any) -> bool:
    return hasattr(type(obj), "__get__") and any(
        callable(getattr(obj, f, None)) for f in ("fn", "func", "fget", "__wrapped__")
    )


def _is_constant(value: Any, depth: int = 0) -> bool:
    """Module-level values a function may read: small plain data."""
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return True
    if depth > 3:
        return False
    if isinstance(value, tuple | frozenset | list) and len(value) <= 1000:
        return all(_is_constant(v, depth + 1) for v in value)
    if isinstance(value, dict) and len(value) <= 1000:
        return all(
            _is_constant(k, depth + 1) and _is_constant(v, depth + 1)
            for k, v in value.items()
        )
    return isinstance(value, np.ndarray) and value.size <= 10_000


def _is_estimator(obj: Any) -> bool:
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "get_params", None))
        and hasattr(obj, "__dict__")
    )


def _declared_version(est: Any) -> str | None:
    if getattr(est, "_is_samplepipe_wrapper", False):
        return None
    declared = getattr(est, "__samplepipe_tags__", None)
    if not callable(declared):
        return None
    try:
        version = dict(declared()).get("version")
    except Exception:  # noqa: BLE001 - a broken hook is reported by estimator_options
        return None
    return None if version is None else str(version)


def _fitted_attributes(est: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(est).items()
        if k.endswith("_") and not k.startswith("_") and not k.endswith("__")
    }


# ---------------------------------------------------------------------------
# public digests
# ---------------------------------------------------------------------------
def code_identity(obj: Any) -> str:
    """Digest of the code of a class, function or callable (see module notes).

    Examples
    --------
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> code_identity(lambda X: X + 1) == code_identity(lambda X: X + 1)
    True
    >>> code_identity(lambda X: X + 1) == code_identity(lambda X: X + 100)
    False
    """
    hasher = _Hasher()
    hasher.code(obj)
    return hasher.hexdigest()


def estimator_identity(estimator: Any) -> str:
    """Digest of an estimator's code and parameters, recursively (not its fit).

    Parameters that are estimators, callables, arrays or containers are
    followed; a declared ``version`` (see `samplepipe.estimator_options`) is
    included.
    """
    hasher = _Hasher(fitted=False)
    if _is_estimator(estimator):
        hasher.estimator(estimator)
    else:
        hasher.value(estimator)
    return hasher.hexdigest()


def state_digest(value: Any) -> str:
    """Deterministic digest of any value: fitted state, parameters, metadata.

    Arrays are hashed by dtype, shape and bytes; objects by their class's code
    identity and their attributes; estimators also by their fitted attributes.
    """
    hasher = _Hasher()
    hasher.value(value)
    return hasher.hexdigest()


def fitted_digest(estimator: Any) -> str:
    """Digest of the fitted state of ``estimator`` and of the estimators inside it.

    Two fits that give the same fitted attributes (``name_``) have the same
    digest, whatever module the class lives in and however pickle would
    serialise it.
    """
    return state_digest(_nested_fitted_state(estimator))


def _nested_fitted_state(estimator: Any) -> Any:
    state: dict[str, Any] = {}
    for k, v in sorted(vars(estimator).items()):
        if k.endswith("_") and not k.startswith("_") and not k.endswith("__"):
            state[k] = v
        elif _is_estimator(v):
            state[k] = _nested_fitted_state(v)
        elif isinstance(v, list) and any(
            isinstance(s, tuple) and len(s) == 2 and _is_estimator(s[1]) for s in v
        ):
            state[k] = [
                _nested_fitted_state(s[1]) if _is_estimator(s[1]) else s[1]
                for s in v
                if isinstance(s, tuple) and len(s) == 2
            ]
    return state


def value_digest(value: Any) -> str:
    """Fast content digest of one sample's value (array bytes for arrays)."""
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        h = _blake(f"{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).view(np.uint8).data)
        return h.hexdigest()
    return state_digest(value)


def combine(*parts: str) -> str:
    """One digest of several digests (or short strings), in order."""
    h = _blake()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------
# the record stored with each checkpoint
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """What made one checkpoint; stored in the file, compared on load.

    Attributes
    ----------
    step : str
        Digest of the step: its code and parameters, the attribute it
        checkpoints, its file format and, for a fitted step, the digest of its
        fitted state.
    inputs : str
        Digest of this sample's input: the identity of the checkpoint it was
        loaded from, or the content of its in-memory data, plus the metadata
        the step reads (``transform_extra_arguments``).
    key : str
        The sample's key.
    """

    step: str
    inputs: str
    key: str
    format: int = FORMAT_VERSION

    def lineage(self) -> str:
        """The digest a downstream step records as this sample's input."""
        return combine(str(self.format), self.step, self.inputs, self.key)

    def record(self, checksum: str, kind: str) -> str:
        """The text stored in a checkpoint: identity, payload checksum and kind."""
        return f"{self.format}:{self.step}:{self.inputs}:{checksum}:{kind}:{self.key}"

    @classmethod
    def parse(cls, record: str) -> tuple[Identity, str, str]:
        """``(identity, checksum, kind)`` from `record`; ``ValueError`` if malformed."""
        parts = record.split(":", 5)
        if len(parts) != 6:
            msg = f"not a samplepipe checkpoint record: {record[:80]!r}"
            raise ValueError(msg)
        version, step, inputs, checksum, kind, key = parts
        return cls(step, inputs, key, int(version)), checksum, kind
