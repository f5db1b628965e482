"""What makes a checkpoint: the identity of code, parameters, fitted state and inputs.

Everything here is deterministic across processes and module paths: the same
class run as ``__main__.X`` in a script and imported as ``mymodule.X`` has the
same identity, and so do two fits whose fitted state comes out the same.

* `code_identity` stands for the code of a class or callable: for code of an
  installed library (a module under ``site-packages`` or the standard library)
  its distribution and version; for any other code (scripts, notebooks, an
  editable install) its compiled code, the defaults and closure values, and
  every piece of user code it reaches, recursively: functions, classes and
  small constants named as globals; attributes read from user modules
  (``helpers.scale``, ``pkg.sub.scale``); dispatch tables (dicts, lists,
  tuples of functions); ``functools.singledispatch`` registries; decorated
  functions (``__wrapped__``, closures); bound methods and instances of user
  classes held as globals; and, where a module is used in a way that cannot
  be read from the code (``getattr(module, name)``, ``importlib``, an
  ``import`` inside the function, a module passed as a parameter), everything
  the module holds. `_Hasher.FOLLOW` names these ways.
* `estimator_identity` adds an estimator's parameters, recursively.
* `state_digest` hashes fitted state: arrays by their bytes, objects by their
  class's code identity and their attributes. Pickle bytes are never hashed.
* `value_digest` is the fast content digest of one sample's data.
"""

from __future__ import annotations

import datetime
import decimal
import dis
import enum
import fractions
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import pathlib
import pkgutil
import re
import sys
import sysconfig
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .source import source_closure, source_digest

FORMAT_VERSION = 3

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
# code identity
# ---------------------------------------------------------------------------
_code_cache: dict[types.CodeType, tuple[str, tuple[str, ...]]] = {}


def _code_digest(code: types.CodeType) -> tuple[str, tuple[str, ...]]:
    """Digest of a code object and the global names it (and nested code) reads.

    The digest is that of the function's source (`source_digest`: a
    normalised syntax tree, the same on every Python version) when the source
    is the code that runs, else of its bytecode (code built in a REPL, a file
    edited since the import). Line numbers, file names, comments, docstrings
    and the module are left out, so moving a function or importing it under
    another module name keeps its identity. The names come sorted, so their
    order does not depend on how a Python version nests its code.
    """
    cached = _code_cache.get(code)
    if cached is not None:
        return cached
    source = source_digest(code)
    digest = f"s{source}" if source is not None else f"b{_bytecode_digest(code)}"
    result = (digest, tuple(sorted(set(_code_names(code)))))
    _code_cache[code] = result
    return result


def _code_names(code: types.CodeType) -> list[str]:
    """The names ``code`` and the code nested in it read (globals, attributes)."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_code_names(const))
    return names


def _bytecode_digest(code: types.CodeType) -> str:
    """Digest of the bytecode, for code whose source is not the code that runs."""
    h = _blake(b"code")
    h.update(code.co_code)
    h.update(repr((code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    h.update("\0".join(code.co_names).encode("utf-8", "surrogatepass"))
    h.update("\0".join(code.co_varnames).encode("utf-8", "surrogatepass"))
    h.update("\0".join(code.co_freevars).encode("utf-8", "surrogatepass"))
    h.update(getattr(code, "co_exceptiontable", b""))  # try/except (3.11+)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(_bytecode_digest(const).encode())
        elif isinstance(const, frozenset):  # its repr's order is the hash seed's
            h.update(b"frozenset")
            h.update(repr(sorted(repr(c) for c in const)).encode())
        else:
            h.update(type(const).__name__.encode())
            h.update(repr(const).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class _Uses(NamedTuple):
    """How a code object (and the code nested in it) reaches other modules.

    ``chains`` maps each global name to the attribute paths read from it:
    ``helpers.scale(X)`` gives ``{"helpers": {("scale",)}}``, ``pkg.sub.f``
    gives ``("sub", "f")``, and a bare use (``getattr(helpers, name)``,
    ``f(helpers)``) gives the empty path ``()``. ``imports`` lists the
    ``import`` statements run inside the function as ``(name, level,
    from_names)``; ``dynamic`` holds the string constants of a function that
    imports by name (``importlib.import_module``, ``__import__``).
    """

    chains: dict[str, frozenset[tuple[str, ...]]]
    imports: tuple[tuple[str, int, tuple[str, ...]], ...]
    dynamic: tuple[str, ...]


_uses_cache: dict[types.CodeType, _Uses] = {}
_ATTRIBUTE_OPS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
# names of a function that imports or finds modules by a string
_DYNAMIC_IMPORTS = frozenset({"import_module", "__import__", "importlib", "modules"})


def _code_uses(code: types.CodeType) -> _Uses:
    """The attribute chains, imports and imported names of ``code`` (cached).

    Read from the instructions, whose names (``LOAD_GLOBAL``, ``LOAD_ATTR``,
    ``LOAD_METHOD``, ``IMPORT_NAME``, ``IMPORT_FROM``) are the same from
    Python 3.10 to 3.13.
    """
    cached = _uses_cache.get(code)
    if cached is not None:
        return cached
    chains: dict[str, set[tuple[str, ...]]] = {}
    imports: list[tuple[str, int, tuple[str, ...]]] = []
    dynamic: list[str] = []
    ops = list(dis.get_instructions(code))
    i = 0
    while i < len(ops):
        op = ops[i]
        if op.opname == "LOAD_GLOBAL":
            j = i + 1
            while j < len(ops) and ops[j].opname in _ATTRIBUTE_OPS:
                j += 1
            path = tuple(str(o.argval) for o in ops[i + 1 : j])
            chains.setdefault(str(op.argval), set()).add(path)
            i = j
            continue
        if op.opname == "IMPORT_NAME":
            level = ops[i - 2].argval if i >= 2 else 0
            j = i + 1
            names = []
            while j < len(ops) and ops[j].opname in ("IMPORT_FROM", "STORE_FAST"):
                if ops[j].opname == "IMPORT_FROM":
                    names.append(str(ops[j].argval))
                j += 1
            imports.append(
                (str(op.argval), level if isinstance(level, int) else 0, tuple(names))
            )
        i += 1
    if _DYNAMIC_IMPORTS.intersection(code.co_names):
        dynamic.extend(c for c in code.co_consts if isinstance(c, str))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = _code_uses(const)
            for name, paths in inner.chains.items():
                chains.setdefault(name, set()).update(paths)
            imports.extend(inner.imports)
            dynamic.extend(inner.dynamic)
    result = _Uses(
        {name: frozenset(paths) for name, paths in chains.items()},
        tuple(imports),
        tuple(dict.fromkeys(dynamic)),
    )
    _uses_cache[code] = result
    return result


class _Hasher:
    """Feeds a structure into one BLAKE2b digest, deterministically.

    Code of user classes and functions goes in by `code_identity` rules;
    library objects by name and version; arrays by their bytes. Cycles are
    cut by remembering what is being hashed.
    """

    #: The ways code reaches other code that the hasher follows (tests take
    #: one out to show that a test of it can fail).
    FOLLOW = frozenset(
        {
            "globals",
            "defaults",
            "closures",
            "wrapped",
            "partials",
            "bound methods",
            "bases",
            "class attributes",
            "module attributes",
            "whole modules",
            "containers",
            "registries",
            "instances",
            "imports",
            "function attributes",
        }
    )

    def __init__(self, fitted: bool = True) -> None:
        self.fitted = fitted
        self.follow = _Hasher.FOLLOW
        self.h = _blake()
        self.active: set[int] = set()
        self.modules: dict[int, Any] = {}  # modules hashed whole, by id
        # with `ingredients`: what went in, by name (code, library, parameter)
        self.parts: dict[str, dict[str, Any]] | None = None
        self.prefix = ""  # the parameter path of the estimator being hashed
        # what was hashed, by id, with the object: holding it keeps its id from
        # being reused by a temporary (a module __getattr__ makes new ones)
        self.done_code: dict[int, tuple[str, Any]] = {}

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
        if isinstance(obj, pathlib.PurePath):  # by its text: its slots vary
            self.tag(f"{type(obj).__name__}:{obj}")
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

    def _container_or_object(self, obj: Any) -> None:  # noqa: C901 - a dispatch
        if type(obj) not in (list, tuple, dict, set, frozenset) and isinstance(
            obj, Mapping | list | tuple | set | frozenset
        ):
            # OrderedDict, MappingProxyType, a namedtuple, a user dict subclass:
            # its type (a user class by its code), then its items as plain ones
            cls = type(obj)
            if library_version(getattr(cls, "__module__", None)) is None:
                self.code(cls)
            else:
                self.tag(f"{cls.__module__}.{cls.__qualname__}")
            plain: Any = dict(obj) if isinstance(obj, Mapping) else list(obj)
            if isinstance(obj, set | frozenset):
                plain = frozenset(obj)
            self._container_or_object(plain)
            extra = getattr(obj, "__dict__", None)
            if extra:
                self.value(dict(extra))
            return
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
        if not self.library_wrapper(obj):
            self.instance(obj)

    def library_wrapper(self, obj: Any) -> bool:
        """Hash a library object around user code by that code; False if not one.

        ``joblib.Memory(...).cache``, ``functools.lru_cache``, ``np.vectorize``,
        a Prefect task: the code they wrap counts, not their state (a cache's
        timestamp differs in every process).
        """
        wrapped = _wrapped_code(obj)
        cls = type(obj)
        if not wrapped or library_version(cls.__module__) is None:
            return False
        self.tag(f"wrapper:{cls.__module__}.{cls.__qualname__}")
        for inner in wrapped:
            self.code(inner)
        return True

    def array(self, a: np.ndarray) -> None:
        self.tag(f"ndarray:{a.dtype.str}:{a.shape}")
        if a.dtype.hasobject and a.dtype.names:  # a record array: field by field
            for name in a.dtype.names:
                self.tag(name)
                self.array(np.ascontiguousarray(a[name]))
        elif a.dtype.hasobject:
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
        prefix = self.prefix
        for name in sorted(params):
            self.tag(name)
            value = params[name]
            if self.parts is not None and not _is_estimator(value):
                self.parts["parameter"][prefix + name] = [
                    state_digest(value),
                    _printable(value),
                ]
            self.prefix = f"{prefix}{name}__"
            try:
                self.value(value)
            finally:
                self.prefix = prefix
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
            if _is_user_module(obj) and "whole modules" in self.follow:
                self.whole_module(obj)
            else:
                self.tag(f"module:{obj.__name__}:{library}")
            return
        if state is None or (library is not None and not state):
            # library objects without instance state: name and version are enough
            try:
                import joblib

                self.tag(joblib.hash(obj))
            except Exception:  # noqa: BLE001 - unpicklable: fall back to its repr
                text = repr(obj)
                # a repr with an address ("<_thread.lock object at 0x...>")
                # differs in every process: the type is all that is stable
                self.tag(cls.__qualname__ if " at 0x" in text else text)
            return
        self.value(state)

    # -- code --------------------------------------------------------------
    def code(self, obj: Any) -> None:
        key = id(obj)
        known = self.done_code.get(key)
        if known is not None:
            self.tag(known[0])
            return
        self.done_code[key] = (f"<code {getattr(obj, '__qualname__', '?')}>", obj)
        self._code(obj)

    def _code(self, obj: Any) -> None:  # noqa: C901 - one dispatch table
        if isinstance(obj, functools.partial):
            self.tag("partial")
            if "partials" in self.follow:
                self.code(obj.func)
                self.value(obj.args)
                self.value(dict(obj.keywords))
            return
        if isinstance(obj, functools.partialmethod):
            self.tag("partialmethod")
            if "partials" in self.follow:
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
            if "bound methods" in self.follow:
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
            if self.parts is not None:
                name, _, version = library.rpartition("==")
                self.parts["library"][name or library] = version
            return
        if isinstance(obj, type):
            self._class(obj, qualname)
            return
        if isinstance(obj, types.FunctionType):
            self._function(obj, qualname)
            return
        if isinstance(obj, types.BuiltinFunctionType | types.BuiltinMethodType):
            self.tag(f"builtin:{module}.{qualname}")
            bound = getattr(obj, "__self__", None)
            if bound is not None and not isinstance(bound, types.ModuleType):
                self.value(bound)  # re.compile("a").sub: the pattern counts
            return
        if callable(obj):  # a callable instance (of a user class)
            if not self.library_wrapper(obj):
                self.instance(obj)
            return
        self.value(obj)

    def _class(self, cls: type, qualname: str) -> None:
        self.tag(f"class:{qualname}")
        for base in cls.__mro__[1:]:
            if base is object or "bases" not in self.follow:
                continue
            self.code(base)
        if type(cls) is not type and "bases" in self.follow:
            self.tag("metaclass")
            self.code(type(cls))
        for name, attr in sorted(vars(cls).items()):
            if name in _IGNORED_CLASS_ATTRIBUTES or name.startswith("_abc_"):
                continue
            if "class attributes" not in self.follow and not _is_function_like(attr):
                continue
            self.tag(name)
            if _is_function_like(attr) or isinstance(
                attr, staticmethod | classmethod | property | type
            ):
                self.code(attr)
            elif isinstance(attr, functools.partialmethod):
                self.code(attr)
            elif "instances" in self.follow and _is_user_object(attr):
                self.referenced(attr)  # a user descriptor: its code and state
            elif _is_descriptor_with_function(attr):
                self.tag(type(attr).__qualname__)
                for field in _DESCRIPTOR_FIELDS:
                    inner = getattr(attr, field, None)
                    if inner is not None and callable(inner):
                        self.code(inner)
            elif _is_constant(attr, follow=self.follow):
                self.value(attr)
            elif isinstance(attr, types.ModuleType) or (
                "instances" in self.follow and _is_user_object(attr)
            ):
                self.referenced(attr)
            else:  # mutable class state (caches, registries): its type only
                self.tag(type(attr).__qualname__)

    def _function(self, fn: types.FunctionType, qualname: str) -> None:
        digest, names = _code_digest(fn.__code__)
        self.tag(f"function:{qualname}:{digest}")
        if self.parts is not None:
            self.parts["code"][qualname] = digest
        if "defaults" in self.follow:
            self.value(fn.__defaults__)
            self.value(fn.__kwdefaults__)
        if fn.__closure__ and "closures" in self.follow:
            for cell in fn.__closure__:
                try:
                    self.value(cell.cell_contents)
                except ValueError:  # empty cell
                    self.tag("<empty>")
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None and "wrapped" in self.follow:
            self.code(wrapped)
        registry = getattr(fn, "registry", None)
        if "registries" in self.follow and isinstance(registry, Mapping):
            self._registry(registry)
        attributes = {
            k: v for k, v in vars(fn).items() if k not in _FUNCTION_ATTRIBUTES_SKIPPED
        }
        if attributes and "function attributes" in self.follow:
            self.tag(f"attributes:{len(attributes)}")
            for name in sorted(attributes):
                self.tag(name)
                self.referenced(attributes[name])
        module_globals = fn.__globals__
        uses = _code_uses(fn.__code__)
        for name in names if "globals" in self.follow else ():
            if name not in module_globals:
                continue
            value = module_globals[name]
            if isinstance(value, types.ModuleType):
                # the module's code comes in through the attributes read from it
                self._module_use(name, value, uses.chains.get(name, frozenset()))
            else:
                self.tag(f"global:{name}")
                self.referenced(value)
        if "whole modules" in self.follow and "globals" in uses.chains:
            # globals()[name]: any global of the function's module
            self.tag("globals()")
            self.namespace(module_globals)
        if "imports" in self.follow:
            package = module_globals.get("__package__")
            for name, level, from_names in uses.imports:
                self._import(name, level, from_names, package)
            for name in uses.dynamic:
                self._import(name, 0, (), package)

    # -- code reached through modules ---------------------------------------
    def _module_use(
        self, name: str, module: types.ModuleType, paths: frozenset[tuple[str, ...]]
    ) -> None:
        """A global module: the code behind each attribute path read from it."""
        if library_version(module.__name__) is not None:
            return  # installed library code, as before: not followed
        if "module attributes" not in self.follow:
            return
        for path in sorted(paths):
            self.tag(f"global:{name}:{'.'.join(path)}")
            target: Any = module
            for i, attribute in enumerate(path):
                if not _is_user_module(target):
                    break  # an attribute of a value: the value holds it
                if attribute.startswith("__") and attribute.endswith("__"):
                    break  # module.__dict__[...]: the module itself, whole
                target = getattr(target, attribute, _MISSING)
                if target is _MISSING:
                    self.tag(f"missing:{'.'.join(path[: i + 1])}")
                    break
            if target is not _MISSING:
                self.referenced(target)

    def referenced(self, value: Any) -> None:
        """A value that code reaches by name: its code, or its content.

        A value that cannot be read (a property that raises, a structure
        nested deeper than the interpreter's recursion limit) counts by its
        type only.
        """
        try:
            self._referenced(value)
        except RecursionError:
            self.tag(f"<too deep: {type(value).__qualname__}>")
        except Exception:  # noqa: BLE001 - a user object whose attributes raise
            self.tag(f"<unreadable: {type(value).__qualname__}>")

    def _referenced(self, value: Any) -> None:
        if isinstance(value, types.ModuleType):
            if library_version(value.__name__) is None:
                self.whole_module(value)
            else:
                self.tag(f"library-module:{library_version(value.__name__)}")
        elif _is_function_like(value) or isinstance(value, type):
            self.code(value)
        elif _is_constant(value, follow=self.follow) or (
            "instances" in self.follow and _is_user_object(value)
        ):
            self.value(value)
        elif "wrapped" in self.follow and self.library_wrapper(value):
            pass
        else:  # a library object (a lock, a logger, a random generator)
            self.tag(f"object:{type(value).__qualname__}")

    def whole_module(self, module: types.ModuleType) -> None:
        """All a module holds, for code that reads it in ways not known statically."""
        if "whole modules" not in self.follow:
            self.tag("module")
            return
        key = id(module)
        if key in self.modules:  # hashed already (or being hashed): once only
            self.tag("<module seen>")
            return
        self.modules[key] = module
        self.tag("module")
        self.namespace(vars(module))
        names = [module.__name__]
        if isinstance(getattr(module, "__path__", None), list | tuple):
            # a package: its submodules, imported yet or not, by their source
            names += sorted(
                f"{module.__name__}.{info.name}"
                for info in pkgutil.iter_modules(module.__path__)
            )
        for name in names:
            closure = source_closure(name, _ROOTS)
            if closure is not None:
                self.tag(f"source:{name}:{closure}")

    def namespace(self, names: Mapping[str, Any]) -> None:
        """The values of a module's namespace, but its dunder names.

        A package's submodules are left out: a submodule is an attribute of
        its package only once something imported it, so the digest would
        depend on what ran before (`whole_module` counts their source).
        """
        prefix = f"{names.get('__name__')}."
        for name, value in sorted(names.items()):
            if name.startswith("__") and name.endswith("__"):
                continue
            if isinstance(value, types.ModuleType) and value.__name__.startswith(
                prefix
            ):
                continue
            self.tag(name)
            if isinstance(value, types.ModuleType) and _is_user_module(value):
                self.whole_module(value)
            else:
                self.referenced(value)

    def _registry(self, registry: Mapping[Any, Any]) -> None:
        """A ``functools.singledispatch`` function's implementations, by type."""
        self.tag(f"registry:{len(registry)}")
        items = sorted(registry.items(), key=lambda kv: _type_name(kv[0]))
        for cls, implementation in items:
            self.tag(_type_name(cls))
            self.code(implementation)

    def _import(
        self,
        name: str,
        level: int,
        from_names: tuple[str, ...],
        package: str | None,
    ) -> None:
        """An ``import`` run by the function: the user module's source, and theirs.

        The modules are found and read as files, never imported here: importing
        runs their code and changes what others hold (a package gains its
        submodule as an attribute), so the identity would depend on what
        happened to be imported before. The source of the module (or of
        ``module.name`` when that is a submodule) counts, with the source of
        every user module it imports, transitively (`source_closure`).
        """
        try:
            absolute = importlib.util.resolve_name("." * level + name, package)
        except (ImportError, ValueError):
            self.tag(f"import:{name}:unresolved")
            return
        for candidate in (absolute, *(f"{absolute}.{n}" for n in from_names)):
            digest = source_closure(candidate, _ROOTS)
            if digest is not None:
                self.tag(f"import:{candidate}:{digest}")


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
    text = repr(k)
    if " at 0x" in text:  # a default repr holds the address: not stable
        text = state_digest(k)
    return (type(k).__name__, text)


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

_MISSING = object()

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

# function attributes that are not the function's own data
_FUNCTION_ATTRIBUTES_SKIPPED = frozenset(
    {"__wrapped__", "registry", "dispatch", "register", "_clear_cache"}
)


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


def ingredients(estimator: Any) -> dict[str, dict[str, Any]]:
    """What `estimator_identity` is made of, by name, to tell what changed.

    Returns ``{"code": {qualified name: digest}, "library": {distribution:
    version}, "parameter": {path: [digest, printable value or None]}}``: every
    user function reached (methods as ``Class.method``), every library the
    code names, and every parameter (nested estimators' as ``outer__inner``).
    """
    hasher = _Hasher(fitted=False)
    hasher.parts = {"code": {}, "library": {}, "parameter": {}}
    if _is_estimator(estimator):
        hasher.estimator(estimator)
    else:
        hasher.value(estimator)
    return hasher.parts


def _printable(value: Any, limit: int = 80) -> str | None:
    """``repr(value)`` when it is short and plain, else None."""
    if not _is_constant(value) or (isinstance(value, np.ndarray) and value.size > 8):
        if not callable(value):
            return None
        text = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"<{text}>"
    text = repr(value)
    return text if len(text) <= limit else None


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


def value_digests(values: list[Any]) -> list[str]:
    """`value_digest` of each value, equal to it, for a batch of samples.

    C-contiguous arrays of one dtype and shape share their header's hasher
    state (one copy per value instead of a new hasher and header each).
    """
    digests: list[str] = []
    append = digests.append
    bases: dict[tuple[Any, tuple[int, ...]], Any] = {}
    for value in values:
        if type(value) is np.ndarray and value.flags.c_contiguous and value.ndim:
            header = (value.dtype, value.shape)
            base = bases.get(header)
            if base is None:
                dtype = value.dtype
                if dtype.kind not in "biufc":  # numbers only: their buffer is exact
                    append(value_digest(value))
                    continue
                base = bases[header] = _blake(f"{dtype.str}{value.shape}".encode())
            h = base.copy()
            h.update(value)  # a C-contiguous array is its bytes' buffer
            append(h.hexdigest())
        else:
            append(value_digest(value))
    return digests


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
