"""The default checkpoint format: one HDF5 file, dataset ``array``, one attribute.

The attribute ``samplepipe`` holds the checkpoint's record (see
`samplepipe.storage.identity.Identity.record`): the identity, a checksum of the
payload and the *kind* of the value, so that every supported type comes back
exactly as it went in (``str`` with NUL characters, ``bytes``, ``U`` and ``S``
arrays, Python and NumPy scalars).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5p, h5s, h5t

from ..errors import ChecksumError as ChecksumError
from ..errors import UnsupportedValueError as UnsupportedValueError

ATTRIBUTE = "samplepipe"
DATASET = "array"
ATTRIBUTE_NAME = ATTRIBUTE.encode()
DATASET_NAME = DATASET.encode()

# One process-wide lock around every h5py call of samplepipe. h5py runs one
# call at a time anyway (its global lock), but opening and closing files from
# several threads at once crashed the interpreter here (h5py 3.16 with HDF5
# 2.0: a segmentation fault in File.close while another thread read a file,
# under Prefect's thread pool; h5py issue #2920 reports the same crash).
H5_LOCK = threading.RLock()

_NATIVE = "biufc"  # dtype kinds HDF5 stores and returns unchanged
_RAW = "SUMmV"  # dtype kinds stored as their bytes, with the dtype in the kind
_PYTHON = {int: "i", float: "f", complex: "c", bool: "?"}
_FROM_PYTHON = {"i": int, "f": float, "c": complex, "?": bool}

# Property lists and types of `image`, made once (h5py's defaults for "w").
_CORE_BLOCK = 64 * 1024
_FCPL = h5p.create(h5p.FILE_CREATE)
_FCPL.set_obj_track_times(False)
_DCPL = h5p.create(h5p.DATASET_CREATE)
_DCPL.set_obj_track_times(False)
_SCALAR = h5s.create(h5s.SCALAR)
_STR_DTYPE = h5py.string_dtype()
_VLEN_STR = h5t.py_create(_STR_DTYPE, logical=True)
_VLEN_STR_MEM = h5t.py_create(_STR_DTYPE)
_READ_FAPL = h5p.create(h5p.FILE_ACCESS)
_READ_FAPL.set_libver_bounds(h5f.LIBVER_EARLIEST, h5f.LIBVER_LATEST)


def encode(value: Any) -> tuple[np.ndarray, str]:
    """``(payload array, kind)`` for a value; `UnsupportedValueError` otherwise."""
    if isinstance(value, np.generic):
        array = np.asarray(value)
        if array.dtype.kind in _NATIVE:
            return array, "g"
        if array.dtype.kind in _RAW and array.dtype.fields is None:
            return _raw(array), "G" + array.dtype.str
        raise UnsupportedValueError(_unsupported(value))
    if type(value) in _PYTHON:
        array = np.asarray(value)
        if array.dtype.kind not in _NATIVE:  # an int beyond 64 bits
            raise UnsupportedValueError(_unsupported(value))
        return array, _PYTHON[type(value)]
    if isinstance(value, str):
        return np.frombuffer(value.encode("utf-8", "surrogatepass"), np.uint8), "s"
    if isinstance(value, bytes):
        return np.frombuffer(value, np.uint8), "y"
    if isinstance(value, bytearray):
        return np.frombuffer(bytes(value), np.uint8), "Y"
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        if kind in _NATIVE:
            return value, "a"
        if kind in _RAW and value.dtype.fields is None and value.dtype.itemsize:
            return _raw(value), "r" + value.dtype.str
    raise UnsupportedValueError(_unsupported(value))


def _raw(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(array.tobytes(), np.uint8).reshape(
        *array.shape, array.dtype.itemsize
    )


def _unsupported(value: Any) -> str:
    what = type(value).__name__
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        what += f" of dtype {dtype}"
    return (
        f"the default checkpoint format cannot store a {what} exactly; it stores "
        "numeric and bool arrays, str, bytes, S/U/datetime arrays and scalars. "
        "Pass save_func and load_func to CheckpointWrapper for such data."
    )


def decode(array: np.ndarray, kind: str) -> Any:
    """The value `encode` was given, from its payload and kind."""
    if kind == "a":
        return array
    if kind == "g":
        return array[()]
    if kind in _FROM_PYTHON:
        return _FROM_PYTHON[kind](array[()])
    if kind == "s":
        return array.tobytes().decode("utf-8", "surrogatepass")
    if kind == "y":
        return array.tobytes()
    if kind == "Y":
        return bytearray(array.tobytes())
    if kind[:1] in ("r", "G"):
        dtype = np.dtype(kind[1:])
        shape = array.shape[:-1]
        value = np.frombuffer(array.tobytes(), dtype).reshape(shape).copy()
        return value[()] if kind[0] == "G" else value
    msg = f"unknown payload kind {kind!r} (written by a newer samplepipe?)"
    raise ValueError(msg)


def checksum(array: np.ndarray, kind: str) -> str:
    """BLAKE2b of a payload: its kind, dtype, shape and bytes."""
    h = hashlib.blake2b(
        f"{kind}|{array.dtype.str}|{array.shape}".encode(), digest_size=16
    )
    h.update(np.ascontiguousarray(array).view(np.uint8).data)
    return h.hexdigest()


def image(payload: np.ndarray, record: str | None) -> bytes:
    """The bytes of an HDF5 file holding ``payload`` as dataset ``array``.

    The file is built in memory (HDF5's ``core`` driver): the disk is then
    written by plain Python I/O, so a full disk or an I/O error is an ordinary
    `OSError` and never leaves the HDF5 library with a half-closed file (which
    crashed the interpreter at exit after ENOSPC).

    It is built through h5py's low-level API, with the settings of
    ``h5py.File(name, "w")`` and ``create_dataset(data=...)`` (no object
    timestamps, contiguous layout) and the record as a variable-length UTF-8
    string attribute, as ``f.attrs[...] = record`` writes it: the same file,
    at half the cost of the high-level calls.
    """
    data = np.asarray(payload, order="C")
    name = f"samplepipe-{threading.get_ident()}-{id(payload)}".encode()
    with H5_LOCK:
        fapl = h5p.create(h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5f.LIBVER_EARLIEST, h5f.LIBVER_LATEST)
        fapl.set_fapl_core(_CORE_BLOCK, False)
        fid = h5f.create(name, h5f.ACC_TRUNC, fapl=fapl, fcpl=_FCPL)
        try:
            space = h5s.create_simple(data.shape)
            did = h5d.create(
                fid,
                DATASET_NAME,
                h5t.py_create(data.dtype, logical=True),
                space,
                dcpl=_DCPL,
            )
            try:
                if data.size:
                    did.write(h5s.ALL, h5s.ALL, data)
            finally:
                did.close()
            if record is not None:
                aid = h5a.create(fid, ATTRIBUTE_NAME, _VLEN_STR, _SCALAR)
                try:
                    aid.write(np.array(record, dtype=_STR_DTYPE), mtype=_VLEN_STR_MEM)
                finally:
                    aid.close()
            h5f.flush(fid)
            return fid.get_file_image()
        finally:
            fid.close()


def _record(f: h5py.File) -> str | None:
    """The record of an open file; None if it has none."""
    record = f.attrs.get(ATTRIBUTE)
    if isinstance(record, bytes):
        record = record.decode("utf-8", "replace")
    return record if isinstance(record, str) else None


def _contents(f: h5py.File, payload: bool) -> tuple[str | None, Any]:
    """``(record, payload array)`` of an open file; `KeyError` without ``array``."""
    dataset = f[DATASET]
    return _record(f), (dataset[...] if payload else None)


def read(path: str | os.PathLike[str], payload: bool = True) -> tuple[str | None, Any]:
    """``(record, payload array)`` of an HDF5 file; record None if it has none.

    Raises `OSError` (or `KeyError`) when the file is not readable HDF5 with
    dataset ``array``.
    """
    with H5_LOCK, h5py.File(path, "r") as f:
        return _contents(f, payload)


def _open_image(blob: bytes) -> h5py.File:
    """An HDF5 file read from its bytes (no disk involved)."""
    return h5py.File(h5py.h5f.open_file_image(blob), "r")


def read_image(blob: bytes, payload: bool = True) -> tuple[str | None, Any]:
    """`read` for the bytes of a file (an object read from a store).

    Raises `ValueError`, `OSError` or `KeyError` when the bytes are not
    readable HDF5 with dataset ``array``.
    """
    with H5_LOCK, _open_image(blob) as f:
        return _contents(f, payload)


def is_readable_image(blob: bytes) -> bool:
    """Whether ``blob`` is a well-formed HDF5 file (of any layout)."""
    try:
        with H5_LOCK, _open_image(blob):
            return True
    except (OSError, ValueError):
        return False


def load_image(blob: bytes) -> Any:
    """`load_hdf5` for the bytes of a file."""
    with H5_LOCK, _open_image(blob) as f:
        payload, kind = _payload(f)
    return decode(payload, kind)


def _payload(f: h5py.File) -> tuple[Any, str]:
    """``(payload, kind)`` of an open file, for `decode`.

    Strings of a file samplepipe did not write come as ``str`` (their kind
    ``"a"`` returns them unchanged).
    """
    kind = _kind(_record(f))
    dataset = f[DATASET]
    if (
        kind == "a"
        and dataset.dtype.kind in "OS"
        and h5py.check_string_dtype(dataset.dtype)
    ):
        return dataset.asstr()[()], kind
    return dataset[...], kind


def _kind(record: str | None) -> str:
    if record is not None:
        parts = record.split(":", 5)
        if len(parts) == 6:
            return parts[4]
    return "a"


def read_payload(path: str | os.PathLike[str]) -> np.ndarray:
    """Dataset ``array`` of a file, read through h5py's low-level API.

    One open of the file and no attribute read: what a loader needs once it
    knows the file's record. Raises `OSError` or `KeyError` when the file is
    not readable HDF5 with dataset ``array``.
    """
    with H5_LOCK:
        fid = h5f.open(os.fsencode(path), h5f.ACC_RDONLY, fapl=_READ_FAPL)
        try:
            did = h5d.open(fid, DATASET_NAME)
            try:
                out = np.empty(did.shape, did.dtype)
                if out.size:
                    did.read(h5s.ALL, h5s.ALL, out)
            finally:
                did.close()
        finally:
            fid.close()
    return out


def load_verified(path: str | os.PathLike[str], record: str) -> Any:
    """The value of a checkpoint whose ``record`` is known, its checksum verified.

    Raises `ChecksumError` when the payload is not the one of ``record``, and
    `OSError` or `KeyError` when the file is not readable.
    """
    parts = record.split(":", 5)
    if len(parts) != 6:
        msg = f"not a samplepipe checkpoint record: {record[:80]!r}"
        raise ValueError(msg)
    expected, kind = parts[3], parts[4]
    payload = read_payload(path)
    if checksum(payload, kind) != expected:
        msg = f"the payload of {os.fspath(path)!r} fails its checksum"
        raise ChecksumError(msg)
    return decode(payload, kind)


def save_hdf5(
    data: Any, path: str | os.PathLike[str], metadata: str | None = None
) -> None:
    """Write ``data`` to an HDF5 file as dataset ``array``.

    Every value `load_hdf5` returns unchanged: numeric and bool arrays, NumPy
    and Python scalars, ``str`` (any text, NUL included), ``bytes``, ``S``,
    ``U`` and datetime arrays. Other values raise ``TypeError``.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.h5")
    >>> save_hdf5("a\\x00b", path)
    >>> load_hdf5(path)
    'a\\x00b'
    """
    payload, kind = encode(data)
    record = metadata if metadata is not None else f"::::{kind}:"
    blob = image(payload, record)
    with open(path, "wb") as f:
        f.write(blob)


def load_hdf5(path: str | os.PathLike[str]) -> Any:
    """Read a file written by `save_hdf5` (or dataset ``array`` of any HDF5 file)."""
    with H5_LOCK, h5py.File(path, "r") as f:
        payload, kind = _payload(f)
    return decode(payload, kind)
