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
from collections import OrderedDict
from typing import Any, NamedTuple

import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5p, h5s, h5t

from ..errors import ChecksumError as ChecksumError
from ..errors import UnsupportedValueError as UnsupportedValueError
from .identity import Record

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
    if type(value) is np.ndarray and value.dtype.kind in _NATIVE:
        return value, "a"  # the common case first
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


class PayloadAt(NamedTuple):
    """Where a file image holds its payload: byte offset, dtype and shape.

    Valid only for the file as written (a loader checks its stamp first); the
    payload is still verified against the checksum of the record when read.
    """

    offset: int
    dtype: str
    shape: tuple[int, ...]


class Image(NamedTuple):
    """The bytes of a checkpoint file and where its payload lies in them."""

    blob: bytes
    payload_at: PayloadAt | None  # None: not known (read through HDF5)


class _Template(NamedTuple):
    """An image built by HDF5 whose payload and record bytes can be swapped."""

    blob: bytes
    payload_at: int
    record_at: int


# Patchable templates by (dtype, shape, record length in bytes), or a marker:
# _ONCE for a layout seen once (a template is made at its second image: data of
# varying shapes never pays for templates it cannot use), _UNFIT for a layout
# whose images failed the check of `_make_template`.
_ONCE = "once"
_UNFIT = "unfit"
_TEMPLATES: OrderedDict[tuple[str, tuple[int, ...], int], _Template | str] = (
    OrderedDict()
)
_TEMPLATES_MAX = 256  # layouts remembered
_TEMPLATES_MAX_BYTES = 16 << 20  # bytes of templates kept, over all layouts
_TEMPLATE_MAX_PAYLOAD = 1 << 20  # larger payloads: HDF5's cost is small beside them
_TEMPLATE_KINDS = "iufc"  # stored byte for byte (bool becomes an HDF5 enum)
_MIN_RECORD = 16  # bytes; shorter records are built by HDF5 each time
_TEMPLATES_LOCK = threading.Lock()
_template_bytes = 0


def image(payload: np.ndarray, record: str | None) -> bytes:
    """The bytes of an HDF5 file holding ``payload`` as dataset ``array``.

    See `image_at`, which also says where the payload lies in them.
    """
    return image_at(payload, record).blob


def image_at(payload: np.ndarray, record: str | None) -> Image:
    """`Image` of an HDF5 file holding ``payload`` as dataset ``array``.

    The file is the one `build_image` makes, byte for byte. Making one costs
    HDF5 ~100-300 us, about what writing it to disk costs. So at the second
    image of a dtype, shape and record length, HDF5 builds two images of that
    layout with random payloads and records, and the first is kept as a
    template once the two differ only in the payload's and the record's
    bytes and swapping those bytes into the first gives the second exactly.
    Images of that layout are then the template with this payload and record
    copied in (HDF5 stores a contiguous, unfiltered dataset and a string
    attribute without anything derived from their content: no checksums, no
    timestamps). Bool arrays, empty payloads, payloads over 1 MiB, records
    under 16 bytes and layouts that fail the check are built by HDF5 each
    time. Templates are bounded: 256 layouts, 16 MiB in all.

    The payload's offset is given whenever the image holds the payload's
    bytes there (``H5Dget_offset``, compared): a template's, or one HDF5
    built for a numeric or bool payload.
    """
    data = np.asarray(payload, order="C")
    if (
        record is None
        or not data.size
        or data.nbytes > _TEMPLATE_MAX_PAYLOAD
        or data.dtype.kind not in _TEMPLATE_KINDS
        or data.dtype.fields is not None
    ):
        return _built(data, record)
    text = record.encode("utf-8")
    if len(text) < _MIN_RECORD:
        return _built(data, record)
    template = _template(data.dtype, data.shape, len(text))
    if template is None:
        return _built(data, record)
    return Image(
        _patched(template, data, text),
        PayloadAt(template.payload_at, data.dtype.str, data.shape),
    )


def _built(data: np.ndarray, record: str | None) -> Image:
    """`Image` built by HDF5; its payload offset if the bytes there are the payload."""
    blob, offset = _build(data, record)
    if offset is None or data.dtype.kind not in _NATIVE or data.dtype.fields:
        return Image(blob, None)
    stored = memoryview(blob)[offset : offset + data.nbytes]
    if stored != data.reshape(-1).view(np.uint8).data:
        return Image(blob, None)
    return Image(blob, PayloadAt(offset, data.dtype.str, data.shape))


def _patched(template: _Template, data: np.ndarray, text: bytes) -> bytes:
    out = bytearray(template.blob)
    start = template.payload_at
    out[start : start + data.nbytes] = data.reshape(-1).view(np.uint8).data
    out[template.record_at : template.record_at + len(text)] = text
    return bytes(out)


def _template(
    dtype: np.dtype[Any], shape: tuple[int, ...], record_size: int
) -> _Template | None:
    """The checked template of a layout; None at its first image or if unfit."""
    key = (dtype.str, shape, record_size)
    with _TEMPLATES_LOCK:
        entry = _TEMPLATES.get(key)
        if entry is None:
            _remember_template(key, _ONCE)
            return None
        _TEMPLATES.move_to_end(key)
    if isinstance(entry, _Template):
        return entry
    if entry == _UNFIT:
        return None
    template = _make_template(dtype, shape, record_size)
    with _TEMPLATES_LOCK:
        _remember_template(key, _UNFIT if template is None else template)
    return template


def _remember_template(
    key: tuple[str, tuple[int, ...], int], entry: _Template | str
) -> None:
    """Keep ``entry`` for ``key``, within the bounds (holding the lock)."""
    global _template_bytes
    old = _TEMPLATES.pop(key, None)
    if isinstance(old, _Template):
        _template_bytes -= len(old.blob)
    _TEMPLATES[key] = entry
    if isinstance(entry, _Template):
        _template_bytes += len(entry.blob)
    while _TEMPLATES and (
        len(_TEMPLATES) > _TEMPLATES_MAX or _template_bytes > _TEMPLATES_MAX_BYTES
    ):
        _, dropped = _TEMPLATES.popitem(last=False)
        if isinstance(dropped, _Template):
            _template_bytes -= len(dropped.blob)


def clear_templates() -> None:
    """Forget every template (as a new process would)."""
    global _template_bytes
    with _TEMPLATES_LOCK:
        _TEMPLATES.clear()
        _template_bytes = 0


def _make_template(
    dtype: np.dtype[Any], shape: tuple[int, ...], record_size: int
) -> _Template | None:
    """A checked template for this layout, or None if HDF5's images vary otherwise.

    Two images of random payloads and records (every byte of each drawn
    anew): the template is kept only if the payload sits where HDF5 says
    (``H5Dget_offset``), the record is found once, outside the payload, the
    two images differ nowhere else, and patching the first gives the second.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    rng = np.random.default_rng()
    images = []
    for _ in range(2):
        data = np.frombuffer(rng.bytes(nbytes), dtype).reshape(shape)
        text = bytes(rng.choice(np.frombuffer(_LETTERS, np.uint8), record_size))
        blob, offset = _build(data, text.decode())
        images.append((data, text, blob, offset))
    (data_a, text_a, blob_a, at), (data_b, text_b, blob_b, at_b) = images
    if at is None or at != at_b or len(blob_a) != len(blob_b):
        return None
    if blob_a[at : at + nbytes] != data_a.tobytes():
        return None
    record_at = blob_a.find(text_a)
    if record_at < 0 or blob_a.find(text_a, record_at + 1) >= 0:
        return None
    if record_at < at + nbytes and at < record_at + record_size:
        return None  # overlapping: not two separate regions
    template = _Template(blob_a, at, record_at)
    if _patched(template, data_b, text_b) != blob_b:
        return None
    return template


_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def build_image(payload: np.ndarray, record: str | None) -> bytes:
    """The bytes of an HDF5 file holding ``payload`` as dataset ``array``, by HDF5.

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
    return _build(np.asarray(payload, order="C"), record)[0]


def _build(data: np.ndarray, record: str | None) -> tuple[bytes, int | None]:
    """`build_image` and the payload's offset in it (None if not stored)."""
    name = f"samplepipe-{threading.get_ident()}-{id(data)}".encode()
    offset = None
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
                    offset = did.get_offset()
            finally:
                did.close()
            if record is not None:
                aid = h5a.create(fid, ATTRIBUTE_NAME, _VLEN_STR, _SCALAR)
                try:
                    aid.write(np.array(record, dtype=_STR_DTYPE), mtype=_VLEN_STR_MEM)
                finally:
                    aid.close()
            h5f.flush(fid)
            return fid.get_file_image(), offset
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
    fields = None if record is None else Record.fields(record)
    return "a" if fields is None else fields.kind


def read_payload(
    path: str | os.PathLike[str], at: PayloadAt | None = None
) -> np.ndarray:
    """Dataset ``array`` of a file, read through h5py's low-level API.

    One open of the file and no attribute read: what a loader needs once it
    knows the file's record. With ``at`` (where `image_at` put the payload
    of a file this process wrote, still unchanged), the payload's bytes are
    read at that offset with plain I/O: no HDF5 call. Raises `OSError` or
    `KeyError` when the file is not readable HDF5 with dataset ``array``.
    """
    if at is not None:
        return _read_at(path, at)
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


def _read_at(path: str | os.PathLike[str], at: PayloadAt) -> np.ndarray:
    """The payload described by ``at``; `OSError` if the file ends before it."""
    out = np.empty(at.shape, np.dtype(at.dtype))
    view = out.reshape(-1).view(np.uint8).data
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(at.offset)
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                msg = f"{os.fspath(path)!r} ends before its payload"
                raise OSError(msg)
            done += n
    return out


def load_verified(
    path: str | os.PathLike[str], record: str, at: PayloadAt | None = None
) -> Any:
    """The value of a checkpoint whose ``record`` is known, its checksum verified.

    ``at``: where the payload lies in a file this process wrote (see
    `read_payload`). Raises `ChecksumError` when the payload is not the one
    of ``record``, and `OSError` or `KeyError` when the file is not readable.
    """
    fields = Record.parse(record)  # ValueError when it is not a record
    expected, kind = fields.checksum, fields.kind
    payload = read_payload(path, at)
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
    if metadata is None:  # a record of the payload's kind alone
        metadata = Record("", "", "", "", kind, "").text()
    blob = image(payload, metadata)
    with open(path, "wb") as f:
        f.write(blob)


def load_hdf5(path: str | os.PathLike[str]) -> Any:
    """Read a file written by `save_hdf5` (or dataset ``array`` of any HDF5 file)."""
    with H5_LOCK, h5py.File(path, "r") as f:
        payload, kind = _payload(f)
    return decode(payload, kind)
