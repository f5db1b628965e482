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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import hdf5
from .files import VALIDATED, Stamp, atomic_write, stamp, temporary_name
from .identity import Identity

CUSTOM_KIND = "custom"
_CHUNK = 1 << 20


class UnknownFileError(FileExistsError):
    """A readable file that samplepipe did not write is in a checkpoint's place."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint changed since it was validated and is no longer valid."""


def sidecar(path: str) -> str:
    """The ``<file>.meta.json`` record beside a file of a custom format."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{name}.meta.json")


def _file_checksum(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_record(path: str, custom: bool = False) -> tuple[str, str | None]:
    """``(status, record)`` of the file at ``path``, checksum verified.

    ``status`` is ``"ok"`` (a verified samplepipe record), ``"missing"``,
    ``"corrupt"`` or ``"unknown"`` (readable, but samplepipe did not write it).
    """
    if not os.path.lexists(path):
        return "missing", None
    if os.path.islink(path) or not os.path.isfile(path):
        return "unknown", None
    if custom:
        try:
            with open(sidecar(path), encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            return "unknown", None
        except (OSError, ValueError):
            return "corrupt", None
        try:
            if meta.get("checksum") != _file_checksum(path):
                return "corrupt", None
        except FileNotFoundError:
            return "missing", None
        except OSError:
            return "corrupt", None
        record = meta.get("record")
        return ("ok", record) if isinstance(record, str) else ("corrupt", None)
    try:
        record, payload = hdf5.read(path)
    except FileNotFoundError:
        return "missing", None
    except (OSError, KeyError, ValueError, TypeError):
        if _is_readable_hdf5(path):
            return "unknown", None
        return "corrupt", None
    if record is None:
        return "unknown", None
    try:
        _, expected, kind = Identity.parse(record)
    except ValueError:
        return "unknown", None
    if hdf5.checksum(payload, kind) != expected:
        return "corrupt", None
    return "ok", record


def _is_readable_hdf5(path: str) -> bool:
    """A well-formed HDF5 file (of someone else's layout)."""
    import h5py

    try:
        with hdf5.H5_LOCK, h5py.File(path, "r"):
            return True
    except (OSError, ValueError):
        return False


def status(
    path: str, wanted: Identity, custom: bool = False, any_inputs: bool = False
) -> tuple[str, Stamp | None]:
    """``(status, stamp)`` of the checkpoint at ``path`` for identity ``wanted``.

    With ``any_inputs``, a checkpoint of this step and key counts as ``valid``
    whatever input it was computed from (how `remove_checkpoints` judges a
    folder without the samples).
    """
    st = stamp(path)
    if st is None:
        if os.path.lexists(path):
            return "unknown", None
        return "missing", None
    cached = VALIDATED.get(_cache_key(path, custom))
    if cached is not None and cached[0] == st:
        found_record = cached[1]
    else:
        result, record = read_record(path, custom)
        if result != "ok" or record is None:
            return result, st
        found_record = record
        if stamp(path) != st:  # replaced while we read it: judge again later
            return "corrupt", st
        remember(path, custom, st, found_record)
    try:
        found, _, _ = Identity.parse(found_record)
    except ValueError:
        return "unknown", st
    if not found.step:
        return "unknown", st
    if found.key != wanted.key:
        return "foreign", st
    if found.format != wanted.format or found.step != wanted.step:
        return "stale", st
    if not any_inputs and found.inputs != wanted.inputs:
        return "stale", st
    return "valid", st


def _cache_key(path: str, custom: bool) -> str:
    return ("custom:" if custom else "hdf5:") + path


def remember(path: str, custom: bool, st: Stamp, record: str) -> None:
    """Record that ``path`` (of this format) holds ``record`` as of ``st``."""
    VALIDATED.remember(_cache_key(path, custom), st, record)


def forget(path: str, custom: bool) -> None:
    """Forget that ``path`` was validated: the next `status` reads the file."""
    VALIDATED.forget(_cache_key(path, custom))


def encode_default(value: Any, identity: Identity) -> tuple[bytes, str]:
    """The file image and record of ``value`` in the default HDF5 format.

    Raises ``TypeError`` for values the format cannot store exactly, before
    anything is written.
    """
    payload, kind = hdf5.encode(value)
    record = identity.record(hdf5.checksum(payload, kind), kind)
    return hdf5.image(payload, record), record


def write_default(path: str, blob: bytes) -> None:
    """Write an encoded default-format checkpoint atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(blob)

    atomic_write(path, write)


def write_custom(
    path: str, value: Any, identity: Identity, save: Callable[[Any, str], Any]
) -> str:
    """Write ``save(value, tmp)`` then its sidecar record, then move it in place.

    The sidecar holds the SHA-256 of the file: a crash between the two moves
    leaves a file whose checksum does not match its sidecar (``corrupt``,
    recomputed), never a file that loads as valid with the wrong record.
    Returns the record.
    """
    tmp = temporary_name(path)
    try:
        save(value, tmp)
        checksum = _file_checksum(tmp)
        record = identity.record(checksum, CUSTOM_KIND)
        meta = json.dumps({"record": record, "checksum": checksum})

        def write_meta(meta_tmp: str) -> None:
            with open(meta_tmp, "w", encoding="utf-8") as f:
                f.write(meta)

        atomic_write(sidecar(path), write_meta)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return record


def remove(path: str, custom: bool = False) -> None:
    """Remove a checkpoint file and, for a custom format, its sidecar."""
    VALIDATED.forget(_cache_key(path, custom))
    targets = (path, sidecar(path)) if custom else (path,)
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
    """

    path: str
    identity: Identity
    stamp: Stamp
    load_func: Callable[[str], Any] | None = None

    def __call__(self) -> Any:
        custom = self.load_func is not None
        if stamp(self.path) != self.stamp:
            found, _ = status(self.path, self.identity, custom)
            if found != "valid":
                msg = (
                    f"Checkpoint {self.path!r} changed since it was written and is "
                    f"now {found}; transform the samples again to recompute it."
                )
                raise CorruptCheckpointError(msg)
        if custom:
            assert self.load_func is not None
            return self.load_func(self.path)
        return hdf5.load_hdf5(self.path)

    def lineage(self) -> str:
        """The input digest of a sample loaded through this loader."""
        try:
            return self.__dict__["_lineage"]
        except KeyError:
            value = self.identity.lineage()
            object.__setattr__(self, "_lineage", value)
            return value
