"""The identity of a function's code from its source, the same on every Python version.

Compiled bytecode changes with the interpreter (3.10, 3.11, 3.12 and 3.13 all
compile one function differently), so a code identity taken from it would
recompute every checkpoint after a Python upgrade. `source_digest` hashes the
function's syntax tree instead, normalised so that comments, formatting, line
numbers and docstrings do not count and every change of behaviour does.

The source is trusted only when it is the code that runs: the file is
compiled again and the function's code object must come out of it unchanged.
A file edited since it was imported, or code without a file (a REPL, `exec`),
gives None, and the caller falls back to the bytecode.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

__all__ = ["module_file", "source_closure", "source_digest"]

_DIGEST_SIZE = 16

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass
class _FileIndex:
    """One source file parsed and compiled once: its functions by first line."""

    codes: dict[tuple[str, int], list[types.CodeType]] = field(default_factory=dict)
    nodes: dict[tuple[str, int], list[ast.AST]] = field(default_factory=dict)


_files: dict[str, tuple[tuple[int, int], _FileIndex | None]] = {}
_digests: dict[types.CodeType, str | None] = {}
_lock = threading.Lock()


def source_digest(code: types.CodeType) -> str | None:
    """Digest of the normalised syntax tree of the function compiled to ``code``.

    None when the source cannot be read, or does not compile to ``code`` any
    more (the file was edited after the import): the caller then uses the
    bytecode, which is the code that runs.
    """
    with _lock:
        if code in _digests:
            return _digests[code]
    digest = _digest(code)
    with _lock:
        _digests[code] = digest
    return digest


def _digest(code: types.CodeType) -> str | None:
    index = _index(code.co_filename)
    if index is None:
        return None
    key = (code.co_name, code.co_firstlineno)
    codes = index.codes.get(key, [])
    nodes = index.nodes.get(key, [])
    if len(codes) != len(nodes):
        return None  # the two walks disagree (unusual nesting): no guess
    for compiled, node in zip(codes, nodes):
        if _same_code(compiled, code):
            h = hashlib.blake2b(b"ast", digest_size=_DIGEST_SIZE)
            h.update(_normalised(node).encode("utf-8", "surrogatepass"))
            return h.hexdigest()
    return None


def _index(filename: str) -> _FileIndex | None:
    """The parsed and compiled file, cached while its size and mtime hold."""
    if not filename or filename.startswith("<"):
        return None
    try:
        st = os.stat(filename)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    with _lock:
        cached = _files.get(filename)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    index = _build(filename)
    with _lock:
        _files[filename] = (stamp, index)
    return index


def _build(filename: str) -> _FileIndex | None:
    try:
        with open(filename, "rb") as f:
            source = importlib.util.decode_source(f.read())
        tree = ast.parse(source, filename)
        module = compile(tree, filename, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    index = _FileIndex()
    stack = [module]
    while stack:  # depth first, in the order of co_consts: source order
        current = stack.pop()
        index.codes.setdefault((current.co_name, current.co_firstlineno), []).append(
            current
        )
        stack.extend(
            reversed([c for c in current.co_consts if isinstance(c, types.CodeType)])
        )
    found = [n for n in ast.walk(tree) if isinstance(n, _DEFINITIONS)]
    found.sort(key=lambda n: (n.lineno, n.col_offset))
    for node in found:
        if isinstance(node, ast.Lambda):
            key = ("<lambda>", node.lineno)
        else:
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            key = (node.name, first)
        index.nodes.setdefault(key, []).append(node)
    return index


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether ``a`` and ``b`` are the same code (nested code by its bytes too)."""
    if (
        a.co_code != b.co_code
        or a.co_names != b.co_names
        or a.co_varnames != b.co_varnames
        or a.co_freevars != b.co_freevars
        or len(a.co_consts) != len(b.co_consts)
    ):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType):
            if not isinstance(y, types.CodeType) or not _same_code(x, y):
                return False
        elif type(x) is not type(y) or repr(x) != repr(y):
            return False
    return True


# fields that never change what code does; and, of the function itself, its
# decorators (code around it, followed through ``__wrapped__`` and closures)
# and its name (the caller counts the qualified name)
_SKIPPED = frozenset({"type_comment", "kind"})
_SKIPPED_AT_TOP = _SKIPPED | {"decorator_list", "name"}


def _normalised(node: ast.AST) -> str:
    """A text of ``node`` without positions, docstrings, decorators or its name.

    Fields that are None or empty are left out, so a node type that gained a
    field in a later Python (``type_params`` in 3.12) reads the same. The
    decorators are part of the code around the function (followed through
    ``__wrapped__`` and closures), and its name is the caller's to count.
    """
    parts: list[str] = []
    _write(node, parts, top=True)
    return "".join(parts)


def _write(value: Any, out: list[str], top: bool = False) -> None:
    if isinstance(value, ast.AST):
        out.append(type(value).__name__)
        out.append("(")
        for name in value._fields:
            if name in (_SKIPPED_AT_TOP if top else _SKIPPED):
                continue
            item = getattr(value, name, None)
            if item is None or (isinstance(item, list) and not item):
                continue
            if name == "body" and isinstance(item, list):
                item = _without_docstring(value, item)
            out.append(name)
            out.append("=")
            _write(item, out)
            out.append(",")
        out.append(")")
    elif isinstance(value, list):
        out.append("[")
        for item in value:
            _write(item, out)
            out.append(",")
        out.append("]")
    else:
        out.append(f"{type(value).__name__}:{value!r}")


def _without_docstring(node: ast.AST, body: list[ast.AST]) -> list[ast.AST]:
    if (
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
        and len(body) > 1
    ):
        return body[1:]
    return body


# ---------------------------------------------------------------------------
# modules imported at run time: their source, found without importing them
# ---------------------------------------------------------------------------
_module_files: dict[str, str | None] = {}
_module_files_path: tuple[str, ...] = ()
_imports: dict[str, tuple[tuple[int, int], tuple[str, tuple[Any, ...]] | None]] = {}


def module_file(name: str, library_roots: tuple[str, ...]) -> str | None:
    """The source file of user module ``name``, found without importing it.

    None for a module of the standard library or an installed package (a file
    under one of ``library_roots``), a built-in one, or one that is not found.
    Importing would run the module's code and change what other modules hold
    (a package gains its submodule as an attribute): the identity of code
    must not depend on what happened to be imported before.
    """
    global _module_files_path
    path_now = tuple(sys.path)
    with _lock:
        if path_now != _module_files_path:
            _module_files.clear()
            _module_files_path = path_now
        if name in _module_files:
            return _module_files[name]
    found: str | None = None
    search: list[str] | None = None
    spec = None
    for part in name.split("."):
        if not part.isidentifier():
            spec = None
            break
        try:
            spec = importlib.machinery.PathFinder.find_spec(part, search)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            break
        search = list(spec.submodule_search_locations or [])
    origin = getattr(spec, "origin", None)
    if origin and origin.endswith(".py") and os.path.isfile(origin):
        if not os.path.realpath(origin).startswith(library_roots):
            found = origin
    with _lock:
        _module_files[name] = found
    return found


def _file_imports(path: str) -> tuple[str, tuple[Any, ...]] | None:
    """``(content digest, imports)`` of a source file, cached by its stamp."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    with _lock:
        cached = _imports.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(path, "rb") as f:
            data = f.read()
        tree = ast.parse(importlib.util.decode_source(data), path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        result = None
    else:
        found: list[tuple[int, str, tuple[str, ...]]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.extend((0, alias.name, ()) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names = tuple(alias.name for alias in node.names if alias.name != "*")
                found.append((node.level, node.module or "", names))
        digest = hashlib.blake2b(data, digest_size=_DIGEST_SIZE).hexdigest()
        result = (digest, tuple(sorted(set(found))))
    with _lock:
        _imports[path] = (stamp, result)
    return result


def source_closure(name: str, library_roots: tuple[str, ...]) -> str | None:
    """Digest of user module ``name``'s source and of every user module it imports.

    Followed through the ``import`` statements of each file, anywhere in it,
    transitively; by module name and content, so the same sources give the
    same digest in any folder. None when ``name`` is not user code.
    """
    origin = module_file(name, library_roots)
    if origin is None:
        return None
    seen: dict[str, str] = {}
    stack = [(name, origin)]
    while stack:
        module, path = stack.pop()
        if module in seen:
            continue
        info = _file_imports(path)
        if info is None:
            seen[module] = "unreadable"
            continue
        digest, imports = info
        seen[module] = digest
        is_package = os.path.basename(path) == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        for level, imported, names in imports:
            try:
                absolute = importlib.util.resolve_name(
                    "." * level + imported, package or None
                )
            except (ImportError, ValueError):
                continue
            for candidate in (absolute, *(f"{absolute}.{n}" for n in names)):
                if candidate and candidate not in seen:
                    found = module_file(candidate, library_roots)
                    if found is not None:
                        stack.append((candidate, found))
    h = hashlib.blake2b(b"closure", digest_size=_DIGEST_SIZE)
    for module in sorted(seen):
        h.update(f"{module}\0{seen[module]}\0".encode())
    return h.hexdigest()
