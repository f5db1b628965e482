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

The machinery lives beside this module: `samplepipe.storage.hashing` (the
hasher, `state_digest`), `samplepipe.storage.bytecode` (a code object's digest
and what it reads), `samplepipe.storage.libraries` (library or user code,
`library_version`) and `samplepipe.storage.source` (a function's source).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .bytecode import _blake
from .hashing import _SCALARS, BATCH_MEMO, _Hasher
from .hashing import state_digest as state_digest
from .libraries import _is_estimator
from .libraries import library_version as library_version

FORMAT_VERSION = 3


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
    if type(obj) is functools.partial and isinstance(obj.func, types.FunctionType):
        return _partial_identity(obj)
    hasher = _Hasher()
    hasher.code(obj)
    return hasher.hexdigest()


@contextlib.contextmanager
def functions_hashed_once() -> Iterator[None]:
    """Within the block, a function's `code_identity` is computed once.

    For a batch of lazy samples whose loaders are ``functools.partial`` of one
    function (``partial(load, path)``): its code is hashed once per batch, not
    once per sample, and so is the digest of a scalar (their
    ``data_version``). No code runs between those hashes that could change
    them; the digests are those computed outside the block.
    """
    token = BATCH_MEMO.set({})
    try:
        yield
    finally:
        BATCH_MEMO.reset(token)


def _partial_identity(obj: functools.partial) -> str:
    """``code_identity`` of a ``functools.partial`` of a plain function.

    The function's code identity, then its arguments: scalars (the common
    ``partial(load, path)``) by their ``repr``, anything else by
    `state_digest`; that is ``combine("partial", function's identity,
    arguments)``. Within `functions_hashed_once` the hasher state after the
    first two parts is kept per function and copied for each sample.
    """
    memo = BATCH_MEMO.get()
    func = obj.func
    known = memo.get(id(func)) if memo is not None else None
    if known is not None and known[0] is func:
        base = known[1]
    else:
        hasher = _Hasher()
        hasher.code(func)
        base = _blake(b"partial\0" + hasher.hexdigest().encode() + b"\0")
        if memo is not None:
            memo[id(func)] = (func, base)
    arguments = (obj.args, tuple(sorted(obj.keywords.items())))
    if all(type(a) in _SCALARS for a in obj.args) and all(
        type(v) in _SCALARS for v in obj.keywords.values()
    ):
        described = "r" + repr(arguments)
    else:
        described = "s" + state_digest(arguments)
    h = base.copy()
    h.update(described.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    return h.hexdigest()


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
        return Record(
            str(self.format), self.step, self.inputs, checksum, kind, self.key
        ).text()

    @classmethod
    def parse(cls, record: str) -> tuple[Identity, str, str]:
        """``(identity, checksum, kind)`` from `record`; ``ValueError`` if malformed."""
        r = Record.parse(record)
        return cls(r.step, r.inputs, r.key, int(r.format)), r.checksum, r.kind


class Record(NamedTuple):
    """The fields of the record text stored with each checkpoint, in order.

    The one place the text is written (`text`) and split (`parse`,
    `fields`, `key_of`). The key comes last and may itself hold ``:``.

    Examples
    --------
    >>> r = Record.parse("3:s:i:c:a:dir/x:y")
    >>> r.key, r.kind
    ('dir/x:y', 'a')
    >>> r.text()
    '3:s:i:c:a:dir/x:y'
    >>> Record.fields("garbage") is None
    True
    """

    format: str
    step: str
    inputs: str
    checksum: str
    kind: str
    key: str

    def text(self) -> str:
        """The record as stored."""
        return ":".join(self)

    @classmethod
    def fields(cls, text: str) -> Record | None:
        """The fields of `text`, or None when it is not a record."""
        parts = text.split(":", 5)
        return cls._make(parts) if len(parts) == 6 else None

    @classmethod
    def parse(cls, text: str) -> Record:
        """The fields of `text`; ``ValueError`` naming it when it is not a record."""
        r = cls.fields(text)
        if r is None:
            msg = f"not a samplepipe checkpoint record: {text[:80]!r}"
            raise ValueError(msg)
        return r

    @staticmethod
    def key_of(text: str) -> str:
        """The key of a record (the whole text when it has no field separator)."""
        return text.split(":", 5)[-1]
