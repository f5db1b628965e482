"""Checkpoint file formats, registered by name: `Format` and `register_format`.

A format turns one sample's value into one checkpoint file and back, and
keeps samplepipe's record beside it: the identity that made the value, a
checksum of the payload and the value's kind (see `samplepipe.storage.identity.
Identity.record`). Formats are registered by name, on the pattern of joblib's
``register_store_backend``; ``CheckpointWrapper(format=...)`` takes a
registered name or an instance. Built in:

``"hdf5"`` (`HDF5Format`, the default)
    one HDF5 file; the record is an attribute inside the file.
``"custom"`` (`CustomFormat`)
    the user's ``save_func(value, path)`` and ``load_func(path)``.
``"npy"`` (`samplepipe.storage.npy.NpyFormat`)
    NumPy's own ``.npy`` files, arrays of non-object dtype only.

A format of one's own subclasses `Format` and implements `save` and `load`
(the payload file only); samplepipe keeps its record in a ``<file>.meta.json``
sidecar holding the file's SHA-256, written as `samplepipe.storage.
checkpoints.write_custom` describes: the sidecar first, then the file moved
into place, so a crash between the two leaves a file that fails its checksum
(recomputed), never one that loads with the wrong record.

Examples
--------
>>> import json, tempfile
>>> from samplepipe.storage import Format, register_format, registered_formats
>>> class JSONFormat(Format):
...     name = "json"
...     extension = ".json"
...     def save(self, value, path):
...         with open(path, "w") as f:
...             json.dump(value, f)
...     def load(self, path):
...         with open(path) as f:
...             return json.load(f)
>>> register_format("json", JSONFormat)
>>> "json" in registered_formats()
True
>>> from samplepipe.storage import Identity
>>> path = tempfile.mkdtemp() + "/s1.json"
>>> record = JSONFormat().write(path, {"a": [1, 2]}, Identity("step", "in", "s1"))
>>> JSONFormat().read(path)
{'a': [1, 2]}
>>> JSONFormat().read_record(path) == ("ok", record)
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from . import checkpoints as ckpt
from . import hdf5
from ._registry import register
from .files import Stamp, write_bytes
from .fs import FileSystem
from .identity import FORMAT_VERSION, Identity, Record, code_identity
from .status import Status

__all__ = [
    "CustomFormat",
    "Format",
    "HDF5Format",
    "get_format",
    "register_format",
    "registered_formats",
    "resolve_format",
]


class Format:
    """Base class of a checkpoint file format (one file per sample).

    Subclasses set `name` and `extension` and implement `save` and `load`,
    which write and read the payload file alone; `write`, `read` and
    `read_record` add samplepipe's record in a ``<file>.meta.json`` sidecar
    with the file's SHA-256. A format object must pickle (it travels with
    lazy samples to workers) and holds no open files.

    Attributes
    ----------
    name : str
        The registered name; also the record's *kind*.
    extension : str
        The default file extension (``CheckpointWrapper(extension=...)`` wins).
    sidecar : bool
        Whether the record lives in a sidecar (True for every format but
        `HDF5Format`, which keeps it inside the file).
    """

    name: ClassVar[str] = ""
    extension: ClassVar[str] = ""
    sidecar: ClassVar[bool] = True

    def identity(self) -> str:
        """What of the format makes a checkpoint valid: its name and code.

        Part of a step's identity (with the extension): changing it
        recomputes every checkpoint. The default digests the code of the
        class's `save` and `load`; a format with parameters that change what
        it writes (a compression level, ...) adds them.
        """
        cls = type(self)
        return f"{self.name}:{code_identity(cls.save)}:{code_identity(cls.load)}"

    def check_value(self, value: Any) -> None:
        """Raise ``TypeError`` for a value this format cannot store exactly.

        Called on every output of a batch before anything is written; the
        default accepts everything.
        """

    def save(self, value: Any, path: str) -> None:
        """Write ``value`` to a new file at ``path`` (the payload alone)."""
        msg = f"{type(self).__name__} must implement save(value, path)."
        raise NotImplementedError(msg)

    def load(self, path: str) -> Any:
        """Read back the value `save` wrote at ``path``."""
        msg = f"{type(self).__name__} must implement load(path)."
        raise NotImplementedError(msg)

    # -- the record, on top of save and load --------------------------------
    def write(self, path: str, value: Any, identity: Identity) -> str:
        """Write ``value`` and its record for ``identity`` atomically; return the
        record (local paths)."""
        self.check_value(value)
        return ckpt.write_custom(path, value, identity, self.save, self.name)

    def write_stored(
        self, path: str, value: Any, identity: Identity, fs: FileSystem
    ) -> tuple[str, Stamp]:
        """`write` on a filesystem that is not local: ``(record, stamp)``."""
        self.check_value(value)
        return ckpt.write_custom_stored(path, value, identity, self.save, fs, self.name)

    def read_record(self, path: str) -> tuple[Status, str | None]:
        """``(status, record)`` of the file at ``path``, checksum verified.

        ``status`` is ``"ok"``, ``"missing"``, ``"corrupt"`` or ``"unknown"``
        (see `samplepipe.storage.checkpoints.read_record`).
        """
        return ckpt.read_record(path, self.sidecar)

    def read(self, path: str) -> Any:
        """The value at ``path``, after its checksum is verified.

        Raises `CorruptCheckpointError` when the file is not a verified
        samplepipe checkpoint.
        """
        found, _ = self.read_record(path)
        if found != Status.OK:
            msg = f"{path!r} is not a valid {self.name} checkpoint: it is {found}."
            raise ckpt.CorruptCheckpointError(msg)
        return self.load(path)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HDF5Format(Format):
    """The default format: one HDF5 file, the record in an attribute inside it.

    See `samplepipe.storage.hdf5`. `CheckpointWrapper` writes it through its
    own fast path (`samplepipe.storage.checkpoints.encode_default`); these
    methods do the same for one file.
    """

    name = "hdf5"
    extension = ".h5"
    sidecar = False

    def identity(self) -> str:  # noqa: D102 - see Format.identity
        return f"hdf5:{FORMAT_VERSION}"

    def check_value(self, value: Any) -> None:  # noqa: D102
        hdf5.encode(value)  # views of native arrays: nothing is copied

    def save(self, value: Any, path: str) -> None:  # noqa: D102
        hdf5.save_hdf5(value, path)

    def load(self, path: str) -> Any:  # noqa: D102
        return hdf5.load_hdf5(path)

    def write(self, path: str, value: Any, identity: Identity) -> str:  # noqa: D102
        encoded = ckpt.encode_default(value, identity)
        write_bytes(path, encoded.blob)
        return encoded.record

    def write_stored(  # noqa: D102
        self, path: str, value: Any, identity: Identity, fs: FileSystem
    ) -> tuple[str, Stamp]:
        encoded = ckpt.encode_default(value, identity)
        return encoded.record, fs.write_bytes(path, encoded.blob)

    def read(self, path: str) -> Any:  # noqa: D102
        record, payload = hdf5.read(path)
        found, record = ckpt._verified(record, payload)
        if found != Status.OK or record is None:
            msg = f"{path!r} is not a valid hdf5 checkpoint: it is {found}."
            raise ckpt.CorruptCheckpointError(msg)
        return hdf5.decode(payload, Record.parse(record).kind)


class CustomFormat(Format):
    """The user's ``save_func(value, path)`` and ``load_func(path)``.

    What ``CheckpointWrapper(save_func=..., load_func=...)`` uses; its
    identity digests the code of both functions.

    Parameters
    ----------
    save_func : callable
        ``save_func(value, path)`` writes a new file at ``path``.
    load_func : callable
        ``load_func(path)`` reads it back.
    """

    name = "custom"
    extension = ".h5"  # what CheckpointWrapper's extension defaults to

    def __init__(
        self, save_func: Callable[[Any, str], Any], load_func: Callable[[str], Any]
    ) -> None:
        if not (callable(save_func) and callable(load_func)):
            msg = (
                f"CustomFormat got save_func={save_func!r} and load_func="
                f"{load_func!r}; both must be callables."
            )
            raise TypeError(msg)
        self.save_func = save_func
        self.load_func = load_func

    def identity(self) -> str:  # noqa: D102
        save, load = self.save_func, self.load_func
        return f"custom:{code_identity(save)}:{code_identity(load)}"

    def save(self, value: Any, path: str) -> None:  # noqa: D102
        self.save_func(value, path)

    def load(self, path: str) -> Any:  # noqa: D102
        return self.load_func(path)

    def __repr__(self) -> str:
        return f"CustomFormat({self.save_func!r}, {self.load_func!r})"


_FORMATS: dict[str, type[Format]] = {}
_BUILT_IN = ("custom", "hdf5", "npy")


def register_format(name: str, cls: type[Format]) -> None:
    """Register a `Format` subclass under ``name``, for ``format=name``.

    Registering a name again replaces its class (joblib's
    ``register_store_backend`` does the same); the built-in names
    (``"hdf5"``, ``"custom"``, ``"npy"``) cannot be replaced.

    Parameters
    ----------
    name : str
        Letters, digits, ``_``, ``-`` or ``.``: it is part of each checkpoint's
        record.
    cls : type
        A subclass of `Format`, built without arguments when a wrapper uses
        the name.

    Raises
    ------
    ValueError
        For a malformed name or a built-in one already registered.
    TypeError
        When ``cls`` is not a `Format` subclass.
    """
    register(_FORMATS, _BUILT_IN, "format", Format, name, cls)


def registered_formats() -> list[str]:
    """The names ``format=`` accepts, sorted."""
    return sorted(_FORMATS)


def get_format(name: str) -> type[Format]:
    """The class registered under ``name``; ValueError naming the registered ones."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        msg = (
            f"unknown checkpoint format {name!r}; the registered formats are "
            f"{registered_formats()} (add one with samplepipe.storage."
            "register_format)."
        )
        raise ValueError(msg) from None


register_format("hdf5", HDF5Format)
register_format("custom", CustomFormat)


_HDF5 = HDF5Format()


def resolve_format(
    fmt: str | Format | None,
    save_func: Callable[[Any, str], Any] | None = None,
    load_func: Callable[[str], Any] | None = None,
    who: str = "CheckpointWrapper",
) -> Format:
    """The `Format` of a wrapper's ``format``, ``save_func`` and ``load_func``.

    None means ``"hdf5"``, or ``"custom"`` when ``save_func`` and
    ``load_func`` are given; a str is a registered name; a `Format` instance
    is used as it is. ``who`` names the caller in messages.

    Raises
    ------
    ValueError
        For an unknown name, only one of ``save_func`` and ``load_func``, or
        both with a format other than ``"custom"``.
    TypeError
        For anything but None, a str or a `Format` instance.
    """
    save, load = save_func, load_func
    if (save is None) != (load is None):
        msg = f"{who} got only one of save_func and load_func; give both or neither."
        raise ValueError(msg)
    original = fmt
    if fmt is None:
        return _HDF5 if save is None else CustomFormat(save, load)  # type: ignore[arg-type]
    if isinstance(fmt, str):
        try:
            cls = get_format(fmt)
        except ValueError as exc:
            msg = f"{who} got format={fmt!r}: {exc}"
            raise ValueError(msg) from None
        if issubclass(cls, CustomFormat):
            if save is None:
                msg = (
                    f"{who} got format={fmt!r} without save_func "
                    "and load_func; give both."
                )
                raise ValueError(msg)
            return cls(save, load)  # type: ignore[arg-type]
        fmt = _HDF5 if cls is HDF5Format else cls()
    elif not isinstance(fmt, Format):
        msg = (
            f"{who} got format={fmt!r}; it must be the name of a "
            "registered format (see samplepipe.storage.registered_formats()) "
            "or a samplepipe.storage.Format instance."
        )
        raise TypeError(msg)
    if save is not None and not isinstance(fmt, CustomFormat):
        msg = (
            f"{who} got save_func and load_func with format="
            f"{original!r}; they are the 'custom' format: remove them or "
            "format."
        )
        raise ValueError(msg)
    return fmt
