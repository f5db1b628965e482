"""Per-sample checkpoint files: their status, writing them, loading them lazily.

Statuses of a file at a checkpoint path:

``valid``
    written by samplepipe for this identity; its payload checksum matches.
``missing``
    no file.
``stale``
    a samplepipe checkpoint of this key made by another step, parameters,
    fitted model or input: never reused, safe to recompute and remove.
``foreign``
    a samplepipe checkpoint holding another key.
``corrupt``
    holds nothing readable (empty, truncated, not HDF5), or a samplepipe
    checkpoint that fails its checksum: recomputed.
``unknown``
    a readable file samplepipe did not write (no samplepipe record): never
    overwritten, never removed.

On a filesystem that is not local (an fsspec URL, see `samplepipe.storage.fs`)
the same statuses hold; an object is read once and judged from its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import CorruptCheckpointError as CorruptCheckpointError
from ..errors import UnknownFileError as UnknownFileError
from . import hdf5
from .files import VALIDATED, Stamp, atomic_write, stamp, write_bytes
from .fs import ChangedWhileReading, FileSystem, filesystem
from .identity import Identity, Record
from .journal import JOURNAL
from .keys import is_url
from .status import Status

CUSTOM_KIND = "custom"
_CHUNK = 1 << 20


def sidecar(path: str) -> str:
    """The ``<file>.meta.json`` record beside a file of a custom format."""
    if is_url(path):
        return f"{path}.meta.json"
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{name}.meta.json")


def _file_checksum(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_record(path: str, custom: bool = False) -> tuple[Status, str | None]:
    """``(status, record)`` of the file at ``path``, checksum verified.

    ``status`` is ``"ok"`` (a verified samplepipe record), ``"missing"``,
    ``"corrupt"`` or ``"unknown"`` (readable, but samplepipe did not write it).
    """
    if not os.path.lexists(path):
        return Status.MISSING, None
    if os.path.islink(path) or not os.path.isfile(path):
        return Status.UNKNOWN, None
    if custom:
        try:
            with open(sidecar(path), encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            # the step's default-format checkpoint, before a save_func was set?
            result, record = read_record(path)
            return (result, record) if result == Status.OK else (Status.UNKNOWN, None)
        except (OSError, ValueError):
            return Status.CORRUPT, None
        if not isinstance(meta, dict):
            return Status.CORRUPT, None
        try:
            if meta.get("checksum") != _file_checksum(path):
                return Status.CORRUPT, None
        except FileNotFoundError:
            return Status.MISSING, None
        except OSError:
            return Status.CORRUPT, None
        record = meta.get("record")
        return (
            (Status.OK, record) if isinstance(record, str) else (Status.CORRUPT, None)
        )
    try:
        record, payload = hdf5.read(path)
    except FileNotFoundError:
        return Status.MISSING, None
    except (OSError, KeyError, ValueError, TypeError):
        if _is_readable_hdf5(path):
            return Status.UNKNOWN, None
        return Status.CORRUPT, None
    return _verified(record, payload)


def _verified(record: str | None, payload: Any) -> tuple[Status, str | None]:
    """``(status, record)`` of a default-format file's record and payload."""
    if record is None:
        return Status.UNKNOWN, None
    try:
        _, expected, kind = Identity.parse(record)
    except ValueError:
        return Status.UNKNOWN, None
    if hdf5.checksum(payload, kind) != expected:
        return Status.CORRUPT, None
    return Status.OK, record


def record_of_bytes(blob: bytes) -> tuple[Status, str | None]:
    """`read_record` for the bytes of a default-format checkpoint."""
    try:
        record, payload = hdf5.read_image(blob)
    except (OSError, KeyError, ValueError, TypeError):
        return (
            Status.UNKNOWN if hdf5.is_readable_image(blob) else Status.CORRUPT
        ), None
    return _verified(record, payload)


def _custom_record_of_bytes(
    blob: bytes, meta_blob: bytes | None
) -> tuple[Status, str | None]:
    """``(status, record)`` of a custom-format file and its sidecar's bytes.

    Without a sidecar, a default-format checkpoint (the step's format before
    a ``save_func`` was set) is still samplepipe's, and stale.
    """
    if meta_blob is None:
        result, record = record_of_bytes(blob)
        return (result, record) if result == Status.OK else (Status.UNKNOWN, None)
    try:
        meta = json.loads(meta_blob)
    except ValueError:
        return Status.CORRUPT, None
    if not isinstance(meta, dict):
        return Status.CORRUPT, None
    if meta.get("checksum") != hashlib.sha256(blob).hexdigest():
        return Status.CORRUPT, None
    record = meta.get("record")
    return (Status.OK, record) if isinstance(record, str) else (Status.CORRUPT, None)


def _read_optional(fs: FileSystem, path: str) -> bytes | None:
    try:
        return fs.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def read_stored_record(
    path: str, custom: bool, fs: FileSystem, known: Stamp | None = None
) -> tuple[Status, str | None, Stamp | None, bytes | None]:
    """``(status, record, stamp, content)`` of a checkpoint on any filesystem.

    The object is read once (with its stamp; ``known`` is one a listing
    gave); the record and checksum are verified from the bytes. ``status``
    as in `read_record`, plus ``"changed"`` when the object kept changing
    while it was read.
    """
    try:
        stamped = fs.read_stamped(path, known)
    except ChangedWhileReading:
        return Status.CHANGED, None, None, None
    if stamped is None:
        return Status.MISSING, None, None, None
    blob, st = stamped
    if custom:
        result, record = _custom_record_of_bytes(
            blob, _read_optional(fs, sidecar(path))
        )
    else:
        result, record = record_of_bytes(blob)
    return result, record, st, blob


def _is_readable_hdf5(path: str) -> bool:
    """A well-formed HDF5 file (of someone else's layout)."""
    import h5py

    try:
        with hdf5.H5_LOCK, h5py.File(path, "r"):
            return True
    except (OSError, ValueError):
        return False


def check(
    path: str,
    wanted: Identity,
    custom: bool = False,
    any_inputs: bool = False,
    fs: FileSystem | None = None,
    known: Stamp | None = None,
    any_record: bool = False,
) -> tuple[Status, Stamp | None, str | None]:
    """``(status, stamp, record)`` of the checkpoint at ``path`` for ``wanted``.

    ``record`` is the verified record of the file (None unless it has one).
    With ``any_inputs``, a checkpoint of this step and key counts as ``valid``
    whatever input it was computed from (how `remove_checkpoints` judges a
    folder without the samples). ``fs`` is the filesystem of ``path`` (local
    when None); ``known`` a stamp of the object that a store's listing gave
    just before (saves a request per object).

    A local default-format file is judged, in this order, from this process's
    validation cache, from the journal of its folder (`samplepipe.storage.
    journal`: a line of another process with this file's stamp), or by reading
    it; a file read and verified is added to the journal. The journal only
    ever makes a file ``valid``: every other status comes from the file,
    except with ``any_record`` (read-only callers, such as ``explain``, that
    decide nothing from the status): then the journal's record of the file's
    present stamp is judged whatever it says.
    """
    if fs is not None and not fs.local:
        return _stored_status(path, wanted, custom, any_inputs, fs, known)
    st = stamp(path)
    if st is None:
        if os.path.lexists(path):
            return Status.UNKNOWN, None, None
        return Status.MISSING, None, None
    cached = VALIDATED.get(_cache_key(path, custom))
    if cached is not None and cached[0] == st:
        found_record = cached[1]
    else:
        if not custom:
            journaled = JOURNAL.lookup(path, st)
            if journaled is not None:
                verdict = judge(journaled, wanted, any_inputs)
                if verdict == Status.VALID:
                    remember(path, custom, st, journaled)
                    return Status.VALID, st, journaled
                if any_record:
                    return verdict, st, journaled
        result, record = read_record(path, custom)
        if result != Status.OK or record is None:
            return result, st, None
        found_record = record
        if stamp(path) != st:  # replaced while we read it: judge again later
            return Status.CORRUPT, st, None
        remember(path, custom, st, found_record)
        if not custom:
            JOURNAL.add([(path, st, found_record)])
    return judge(found_record, wanted, any_inputs), st, found_record


def judge(record: str, wanted: Identity, any_inputs: bool = False) -> Status:
    """Status of a checkpoint holding verified ``record`` for identity ``wanted``."""
    try:
        found, _, _ = Identity.parse(record)
    except ValueError:
        return Status.UNKNOWN
    if not found.step:
        return Status.UNKNOWN
    if found.key != wanted.key:
        return Status.FOREIGN
    if found.format != wanted.format or found.step != wanted.step:
        return Status.STALE
    if not any_inputs and found.inputs != wanted.inputs:
        return Status.STALE
    return Status.VALID


def _stored_status(
    path: str,
    wanted: Identity,
    custom: bool,
    any_inputs: bool,
    fs: FileSystem,
    known: Stamp | None = None,
) -> tuple[Status, Stamp | None, str | None]:
    """`check` on a filesystem that is not local (an object store).

    A file validated before costs one stamp (a HEAD, none with ``known``);
    otherwise the object is read once (a GET, and a HEAD for its stamp unless
    ``known`` is its stamp) and verified from its bytes.
    """
    cached = VALIDATED.get(_cache_key(path, custom, fs))
    if cached is not None:
        st = known or fs.stamp(path)
        if st is None:
            forget(path, custom, fs)
            return Status.MISSING, None, None
        if cached[0] == st:
            return judge(cached[1], wanted, any_inputs), st, cached[1]
    result, record, st, _ = read_stored_record(path, custom, fs, known)
    if result == Status.CHANGED:
        return Status.CORRUPT, fs.stamp(path), None  # replaced while we read it
    if result != Status.OK or record is None:
        return result, st, None
    assert st is not None
    remember(path, custom, st, record, fs)
    return judge(record, wanted, any_inputs), st, record


def _cache_key(path: str, custom: bool, fs: FileSystem | None = None) -> str:
    key = ("custom:" if custom else "hdf5:") + path
    if fs is not None and not fs.local:
        key = f"{fs.token}|{key}"
    return key


def remember(
    path: str, custom: bool, st: Stamp, record: str, fs: FileSystem | None = None
) -> None:
    """Record that ``path`` (of this format) holds ``record`` as of ``st``."""
    VALIDATED.remember(_cache_key(path, custom, fs), st, record)


def forget(path: str, custom: bool, fs: FileSystem | None = None) -> None:
    """Forget that ``path`` was validated: the next `check` reads the file."""
    VALIDATED.forget(_cache_key(path, custom, fs))


def journal_written(written: Sequence[tuple[str, Stamp, str]]) -> None:
    """Record ``(path, stamp, record)`` of local default-format files just written.

    A new process then trusts them from one stat (see `check`).
    """
    JOURNAL.add(written)


class Encoded(NamedTuple):
    """A default-format checkpoint ready to write (see `encode_default`)."""

    blob: bytes
    record: str
    payload_at: hdf5.PayloadAt | None  # where the payload lies in ``blob``


def encode_default(value: Any, identity: Identity) -> Encoded:
    """The file image, record and payload offset of ``value`` (default format).

    Raises ``TypeError`` for values the format cannot store exactly, before
    anything is written.
    """
    payload, kind = hdf5.encode(value)
    record = identity.record(hdf5.checksum(payload, kind), kind)
    blob, at = hdf5.image_at(payload, record)
    return Encoded(blob, record, at)


def write_default(path: str, blob: bytes) -> None:
    """Write an encoded default-format checkpoint atomically."""
    write_bytes(path, blob)


def write_custom(
    path: str,
    value: Any,
    identity: Identity,
    save: Callable[[Any, str], Any],
    kind: str = CUSTOM_KIND,
) -> str:
    """Write ``save(value, tmp)`` then its sidecar record, then move it in place.

    The sidecar holds the SHA-256 of the file: a crash between the two moves
    leaves a file whose checksum does not match its sidecar (``corrupt``,
    recomputed), never a file that loads as valid with the wrong record.
    ``kind`` is the record's kind (the format's name). Returns the record.
    """
    record = ""

    def write(tmp: str) -> None:
        nonlocal record
        save(value, tmp)
        checksum = _file_checksum(tmp)
        record = identity.record(checksum, kind)
        meta = json.dumps({"record": record, "checksum": checksum})
        write_bytes(sidecar(path), meta.encode("utf-8"))

    atomic_write(path, write)  # moves the file in place after its sidecar
    return record


def write_custom_stored(
    path: str,
    value: Any,
    identity: Identity,
    save: Callable[[Any, str], Any],
    fs: FileSystem,
    kind: str = CUSTOM_KIND,
) -> tuple[str, Stamp]:
    """`write_custom` on a filesystem that is not local.

    ``save`` writes a local temporary file of the same name; its bytes go to
    the store after the sidecar, each in one atomic write. A crash between
    the two leaves a file whose checksum does not match its sidecar
    (``corrupt``). Returns ``(record, stamp)``.
    """
    with tempfile.TemporaryDirectory(prefix="samplepipe-") as folder:
        local = os.path.join(folder, posixpath.basename(path))
        save(value, local)
        with open(local, "rb") as f:
            blob = f.read()
    checksum = hashlib.sha256(blob).hexdigest()
    record = identity.record(checksum, kind)
    meta = json.dumps({"record": record, "checksum": checksum}).encode()
    fs.write_bytes(sidecar(path), meta)
    return record, fs.write_bytes(path, blob)


def remove(path: str, custom: bool = False, fs: FileSystem | None = None) -> None:
    """Remove a checkpoint file and, for a custom format, its sidecar."""
    VALIDATED.forget(_cache_key(path, custom, fs))
    targets = (path, sidecar(path)) if custom else (path,)
    if fs is not None and not fs.local:
        for target in targets:
            fs.remove(target)
        return
    for target in targets:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class CheckpointLoader:
    """Loads one checkpoint; picklable, so delayed samples travel to workers.

    ``identity`` is what the file must hold. On each call, a cheap ``os.stat``
    checks that the file is still the one that was validated (same size,
    modification time, inode and change time); a changed file is validated
    again before it is read.

    A default-format file is then opened once: its payload is read and checked
    against the checksum of ``record``, the verified record of the file (when
    the loader has none, the file's own record is read, verified and judged in
    the same open). A loader made by the process that wrote the file knows
    where the payload lies in it (``payload_at``, see `samplepipe.storage.
    hdf5.image_at`): while the stamp is the one written, it reads the
    payload's bytes there with plain I/O instead of opening the file through
    HDF5, and checks them against the checksum all the same. A ``record``
    that was not verified against the file
    (``record_verified=False``: one named by a flow's manifest) is a shortcut
    only: when the payload fails it, the file is judged by its own record. A file
    that fails raises `CorruptCheckpointError`, is no longer trusted by this
    process nor by the journal, and is recomputed by the next ``transform``: a
    loaded value is always the one validated.

    A checkpoint at a URL is read once per call and verified from its bytes
    (record and checksum): one GET, no stamp check. The loader keeps the URL
    and ``storage_options`` (never an open filesystem); a custom ``load_func``
    then receives a local temporary copy, removed when it returns.
    """

    path: str
    identity: Identity
    stamp: Stamp
    load_func: Callable[[str], Any] | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    record: str | None = field(default=None, repr=False)
    record_verified: bool = field(default=True, repr=False)
    payload_at: hdf5.PayloadAt | None = field(default=None, repr=False)

    def __call__(self) -> Any:
        custom = self.load_func is not None
        if "://" in self.path and is_url(self.path):
            return self._load_stored(custom)
        record = self.record
        at = self.payload_at  # where this process wrote the payload
        st = stamp(self.path)
        if st != self.stamp:
            at = None
            found, st, record = check(self.path, self.identity, custom)
            if found != Status.VALID:
                raise CorruptCheckpointError(self._changed(found))
        if custom:
            assert self.load_func is not None
            return self.load_func(self.path)
        try:
            if record is not None:
                try:
                    return hdf5.load_verified(self.path, record, at)
                except hdf5.ChecksumError:
                    if self.record_verified or record is not self.record:
                        raise
                    # a record from a manifest that does not fit: judge the file
            return self._load_and_judge()
        except (OSError, KeyError, ValueError, TypeError) as exc:
            forget(self.path, custom)
            if st is not None:
                JOURNAL.revoke(self.path, st)
            raise CorruptCheckpointError(self._changed(Status.CORRUPT)) from exc

    def _load_and_judge(self) -> Any:
        """Read the record and payload in one open; verify both, then decode."""
        record, payload = hdf5.read(self.path)
        found, record = _verified(record, payload)
        self._raise_unless_mine(found, record)
        assert record is not None
        return hdf5.decode(payload, Record.parse(record).kind)

    def _raise_unless_mine(self, found: Status, record: str | None) -> None:
        """`CorruptCheckpointError` unless a verified ``record`` (``found`` is
        ``"ok"``) is that of the loader's identity."""
        if found == Status.OK:
            assert record is not None
            found = judge(record, self.identity)
        if found != Status.VALID:
            raise CorruptCheckpointError(self._changed(found))

    def _changed(self, found: Status) -> str:
        return (
            f"Checkpoint {self.path!r} changed since it was written and is "
            f"now {found}; transform the samples again to recompute it."
        )

    def _load_stored(self, custom: bool) -> Any:
        """Read the object once and verify it from its bytes, then decode it."""
        fs = filesystem(self.path, self.storage_options)
        blob = _read_optional(fs, self.path)
        if blob is None:
            found = Status.MISSING
        elif custom:
            found, record = _custom_record_of_bytes(
                blob, _read_optional(fs, sidecar(self.path))
            )
        else:
            found, record = record_of_bytes(blob)
        self._raise_unless_mine(found, record)
        assert blob is not None
        if not custom:
            return hdf5.load_image(blob)
        assert self.load_func is not None
        with tempfile.TemporaryDirectory(prefix="samplepipe-") as folder:
            local = os.path.join(folder, posixpath.basename(self.path))
            with open(local, "wb") as f:
                f.write(blob)
            return self.load_func(local)

    def lineage(self) -> str:
        """The input digest of a sample loaded through this loader."""
        try:
            return self.__dict__["_lineage"]
        except KeyError:
            value = self.identity.lineage()
            object.__setattr__(self, "_lineage", value)
            return value
