"""Compiled code: a code object's digest and the names, modules and imports it reads.

`_code_digest` is the digest of a function's code: that of its source
(`samplepipe.storage.source.source_digest`) when the source is the code that
runs, else of its bytecode. `_code_uses` reads from the instructions how the
code reaches other modules: the attribute chains read from each global name,
the ``import`` statements run inside it, and the modules it imports by name.
"""

from __future__ import annotations

import dis
import hashlib
import types
from typing import Any, NamedTuple

from .source import source_digest

_DIGEST_SIZE = 16


def _blake(data: bytes = b"") -> Any:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE)


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
