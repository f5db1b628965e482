"""The hasher: any structure fed into one digest, code by its identity, arrays by bytes.

`_Hasher` is what `samplepipe.storage.identity`'s digests are made with:
values go in by their content, code of user classes and functions by its
compiled code and every piece of user code it reaches (`_Hasher.FOLLOW` names
the ways), library objects by name and version. `state_digest` is the digest of
one value.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.util
import pathlib
import pkgutil
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from .bytecode import _blake, _code_digest, _code_uses
from .libraries import (
    _DESCRIPTOR_FIELDS,
    _ROOTS,
    _is_constant,
    _is_descriptor_with_function,
    _is_estimator,
    _is_function_like,
    _is_user_module,
    _is_user_object,
    _type_name,
    _wrapped_code,
    library_version,
)
from .source import source_closure


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


_MISSING = object()


# function attributes that are not the function's own data
_FUNCTION_ATTRIBUTES_SKIPPED = frozenset(
    {"__wrapped__", "registry", "dispatch", "register", "_clear_cache"}
)


def _printable(value: Any, limit: int = 80) -> str | None:
    """``repr(value)`` when it is short and plain, else None."""
    if not _is_constant(value) or (isinstance(value, np.ndarray) and value.size > 8):
        if not callable(value):
            return None
        text = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"<{text}>"
    text = repr(value)
    return text if len(text) <= limit else None


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


def state_digest(value: Any) -> str:
    """Deterministic digest of any value: fitted state, parameters, metadata.

    Arrays are hashed by dtype, shape and bytes; objects by their class's code
    identity and their attributes; estimators also by their fitted attributes.
    """
    memo = BATCH_MEMO.get()
    if memo is not None and type(value) in _SCALARS:
        key = ("value", type(value), value)
        known = memo.get(key)
        if known is None:
            known = memo[key] = _state_digest(value)
        return known
    return _state_digest(value)


def _state_digest(value: Any) -> str:
    hasher = _Hasher()
    hasher.value(value)
    return hasher.hexdigest()


# What a batch's identities share, computed once within
# `samplepipe.storage.identity.functions_hashed_once`: the code identity of a
# function (by id, with the function) and the digest of a scalar (a version).
BATCH_MEMO: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "samplepipe_batch_memo", default=None
)
_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})
