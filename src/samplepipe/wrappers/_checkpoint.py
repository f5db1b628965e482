"""CheckpointWrapper: HDF5 checkpoints of transformed samples and fitted models."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass

import cloudpickle
import h5py
import numpy as np
from sklearn.utils.metaestimators import available_if

from ._base import (
    FORMAT_VERSION,
    estimator_requires_fit,
    fitted_fingerprint,
    joblib,
    params_fingerprint,
    qualified_name,
    resolve_option,
)
from ._sample import DelayedSample, Sample, is_sample_list
from ._sample_wrapper import BaseWrapper, _estimator_has, _flatten, _unflatten

ATTRIBUTE = "samplepipe"
DATASET = "array"
MODEL_MAGIC = b"samplepipe-model\n"
_TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname()
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_COMPONENT = 200  # bytes; leaves room for the extension and a temporary suffix
# OSErrors that retrying cannot fix: reported at once.
_PERMANENT_ERRNOS = {
    errno.ENOSPC,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EDQUOT,
    errno.EEXIST,
}


class CheckpointWarning(UserWarning):
    """Checkpoints were found stale or corrupt and are recomputed.

    Silence with ``warnings.simplefilter("ignore", samplepipe.CheckpointWarning)``.
    """


# ---------------------------------------------------------------------------
# keys and paths
# ---------------------------------------------------------------------------
def check_key(key, index=None, owner="CheckpointWrapper"):
    """Validate a sample key; return it. Raise ``ValueError`` naming the rule.

    A key is a relative path of ``/``-separated components. Rejected: a missing
    or non-string key, the empty string, NUL or control characters, a
    backslash, a drive prefix (``C:``), an absolute path, empty, ``.`` or ``..``
    components, components starting with ``.`` (reserved for temporary files),
    components longer than 200 bytes and strings that are not valid UTF-8.
    ``"a..b"`` is a valid key.
    """
    where = f"sample {index}" if index is not None else "a sample"
    rule = None
    if not isinstance(key, str):
        rule = "keys must be strings (give every sample a str 'key' attribute)"
    elif not key:
        rule = "keys must not be empty"
    elif any(ord(c) < 32 or c == "\x7f" for c in key):
        rule = "keys must not contain NUL or control characters"
    elif "\\" in key:
        rule = "keys must not contain a backslash; use '/' to make sub-folders"
    elif key.startswith("/"):
        rule = "keys must be relative paths, not absolute ones"
    elif _DRIVE.match(key):
        rule = "keys must not start with a drive prefix such as 'C:'"
    else:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            rule = "keys must be valid UTF-8 text"
        else:
            for part in key.split("/"):
                if part in ("", ".", ".."):
                    rule = (
                        "keys must be normalised relative paths inside "
                        "'features_dir' without empty, '.' or '..' components"
                    )
                elif part.startswith("."):
                    rule = (
                        "key components must not start with '.' (reserved for "
                        "temporary files)"
                    )
                elif len(part.encode("utf-8")) > _MAX_COMPONENT:
                    rule = (
                        f"each '/'-separated part of a key must be at most "
                        f"{_MAX_COMPONENT} bytes long"
                    )
                if rule:
                    break
    if rule:
        msg = f"{owner} got key {key!r} for {where}; {rule}."
        raise ValueError(msg)
    return key


def sample_keys(samples, owner="CheckpointWrapper"):
    """Checked keys of ``samples``; duplicates raise ``ValueError``."""
    keys, seen = [], {}
    for i, s in enumerate(samples):
        if s is None:
            msg = f"{owner} got None instead of a sample at index {i}."
            raise ValueError(msg)
        try:
            key = s.key
        except AttributeError:
            key = None
            msg = (
                f"{owner} got sample {i} without a 'key' attribute ({s!r}); give "
                "every sample a unique str key, e.g. Sample(data, key='id-1')."
            )
            raise ValueError(msg) from None
        check_key(key, i, owner)
        if key in seen:
            msg = (
                f"{owner} got key {key!r} for samples {seen[key]} and {i}; keys must "
                "be unique within one call."
            )
            raise ValueError(msg)
        seen[key] = i
        keys.append(key)
    return keys


def keys_digest(keys):
    """SHA-256 of an ordered list of keys; its cost grows with the keys only."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def upstream_fingerprint(samples):
    """Lineage of ``samples``: the fingerprints of the checkpoints they load from.

    Samples returned by a `CheckpointWrapper` load through a `CheckpointLoader`
    that knows the fingerprint of the step that made them (which includes that
    step's own upstream). Returns None for samples that come from no checkpoint.
    """
    found = set()
    for s in samples:
        loader = getattr(s, "_load", None)
        if isinstance(loader, CheckpointLoader):
            found.add(loader.metadata.split(":", 2)[1])
    if not found:
        return None
    if len(found) == 1:
        return found.pop()
    return joblib.hash(sorted(found))


def hash_string(key, n_buckets=1000):
    """A sub-folder name that spreads keys evenly over ``n_buckets`` folders.

    Pass ``hash_fn=samplepipe.hash_string`` to `CheckpointWrapper` when one folder
    would hold too many files.

    Examples
    --------
    >>> hash_string("subject_0001/sample_07")
    '...'
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    width = len(str(n_buckets - 1))
    return f"{int.from_bytes(digest, 'big') % n_buckets:0{width}d}"


# ---------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------
def _temporary_name(path):
    folder, name = os.path.split(path)
    tag = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(folder, f".{name}.{tag}{_TMP_SUFFIX}")


def atomic_write(path, write, *, fsync=False):
    """Write a file through ``write(tmp_path)`` and move it into place.

    The temporary file lives in the same folder, so ``os.replace`` is atomic: a
    reader sees the old file or the new one, never half of one. The temporary
    file is removed on any failure.
    """
    tmp = _temporary_name(path)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_temporary_file(name):
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _temporary_owner_alive(name):
    """Whether the process that owns a temporary file may still be writing it."""
    parts = name[: -len(_TMP_SUFFIX)].rsplit(".", 1)[-1].rsplit("-", 2)
    if len(parts) != 3:
        return False
    host, pid, _ = parts
    if host != _HOST:
        return True  # another machine: leave it to the age rule
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder, max_age=3600.0):
    """Remove temporary files left in ``folder`` by crashed writers.

    A temporary file is removed when its writer process no longer exists on this
    host, or it is older than ``max_age`` seconds. Returns the removed paths.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not is_temporary_file(entry.name):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > max_age
        except FileNotFoundError:
            continue
        mine = f"-{os.getpid()}-" in entry.name and _HOST in entry.name
        if mine:
            continue  # our own writer threads may be using it right now
        if old or not _temporary_owner_alive(entry.name):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


# ---------------------------------------------------------------------------
# default HDF5 format
# ---------------------------------------------------------------------------
# One process-wide lock around every h5py call of samplepipe. h5py runs one
# call at a time anyway (its global lock), but opening and closing files from
# several threads at once crashed the interpreter here (h5py 3.16 with HDF5
# 2.0: a segmentation fault in File.close while another thread read a file,
# under Prefect's thread pool; h5py issue #2920 reports the same crash).
# Taking the lock costs no parallelism.
H5_LOCK = threading.RLock()


def hdf5_image(data, metadata=None):
    """The bytes of an HDF5 file holding ``data`` as dataset ``array``.

    The file is built in memory (HDF5's ``core`` driver): the disk is then
    written by plain Python I/O, so a full disk or an I/O error is an ordinary
    `OSError` and never leaves the HDF5 library with a half-closed file (which
    crashed the interpreter at exit after ENOSPC).
    """
    if isinstance(data, str):
        value = data
    else:
        value = np.asarray(data)
        if value.dtype.kind not in "biufcSUb?":
            msg = (
                f"save_hdf5 cannot store a {type(data).__name__} of dtype "
                f"{value.dtype}; pass save_func and load_func to CheckpointWrapper "
                "for such data."
            )
            raise TypeError(msg)
    name = f"samplepipe-{threading.get_ident()}-{id(value)}"
    with H5_LOCK, h5py.File(name, "w", driver="core", backing_store=False) as f:
        f.create_dataset(DATASET, data=value)
        if metadata is not None:
            f.attrs[ATTRIBUTE] = metadata
        f.flush()
        return f.id.get_file_image()


def save_hdf5(data, path, metadata=None):
    """Write ``data`` as dataset ``array`` of an HDF5 file, with ``metadata``.

    Arrays, NumPy scalars, numbers and strings are supported; anything else
    needs a ``save_func``.
    """
    image = hdf5_image(data, metadata)
    with open(path, "wb") as f:
        f.write(image)


def load_hdf5(path):
    """Read dataset ``array`` of an HDF5 file written by `save_hdf5`."""
    with H5_LOCK, h5py.File(path, "r") as f:
        dataset = f[DATASET]
        if dataset.dtype.kind in "OS" and h5py.check_string_dtype(dataset.dtype):
            return dataset.asstr()[()]
        return dataset[()]


def _read_metadata(path):
    """The metadata string of a checkpoint file, or None; raise OSError if corrupt."""
    with H5_LOCK, h5py.File(path, "r") as f:
        value = f.attrs.get(ATTRIBUTE)
        if DATASET not in f:
            return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def _sidecar(path):
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{name}.meta.json")


def remove_checkpoint_file(path):
    """Remove a checkpoint file and its ``.meta.json`` sidecar, if present."""
    for target in (path, _sidecar(path)):
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass


def format_metadata(fingerprint, key):
    return f"{FORMAT_VERSION}:{fingerprint}:{key}"


# Files this process wrote or validated: path -> (size, mtime_ns, metadata).
# A hit costs one os.stat; any change of the file (another writer, a deletion)
# changes size or mtime and sends it back to full validation.
_validated: dict[str, tuple[int, int, str]] = {}
_validated_lock = threading.Lock()
_VALIDATED_MAX = 2_000_000


def _remember(path, st, metadata):
    with _validated_lock:
        if len(_validated) >= _VALIDATED_MAX:
            _validated.clear()
        _validated[path] = (st.st_size, st.st_mtime_ns, metadata)


def checkpoint_status(path, metadata, custom_format=False):
    """``("valid" | "missing" | "stale" | "corrupt" | "foreign", stat)``.

    ``stale``: made by another step, parameters or fitted model; ``foreign``: a
    valid file of another key; ``corrupt``: not a readable checkpoint.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", None
    except NotADirectoryError:
        return "corrupt", None
    if not os.path.isfile(path):
        return "corrupt", st
    cached = _validated.get(path)
    if cached is not None and cached == (st.st_size, st.st_mtime_ns, metadata):
        return "valid", st
    try:
        if custom_format:
            with open(_sidecar(path), encoding="utf-8") as f:
                meta = json.load(f)
            if (meta.get("size"), meta.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
                return "corrupt", st
            found = meta.get("metadata")
        else:
            found = _read_metadata(path)
    except (OSError, ValueError, KeyError):
        return "corrupt", st
    if found == metadata:
        _remember(path, st, metadata)
        return "valid", st
    if not isinstance(found, str) or found.count(":") < 2:
        return "corrupt", st
    version, fingerprint, key = found.split(":", 2)
    wanted_version, wanted_fingerprint, wanted_key = metadata.split(":", 2)
    if key != wanted_key:
        return "foreign", st
    return "stale", st


@dataclass(frozen=True)
class CheckpointLoader:
    """Loads one checkpoint; picklable, so delayed samples travel to workers.

    On each call, a cheap ``os.stat`` checks that the file is still the one that
    was validated; a changed file is validated again before it is read.
    """

    path: str
    metadata: str
    size: int
    mtime_ns: int
    load_func: object = None

    def __call__(self):
        custom = self.load_func is not None
        try:
            st = os.stat(self.path)
            changed = (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)
        except FileNotFoundError:
            changed = True
        if changed:
            status, _ = checkpoint_status(self.path, self.metadata, custom)
            if status != "valid":
                msg = (
                    f"Checkpoint {self.path!r} changed since it was written and is "
                    f"now {status}; transform the samples again to recompute it."
                )
                raise RuntimeError(msg)
        if custom:
            return self.load_func(self.path)
        return load_hdf5(self.path)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def save_model(estimator, path, header):
    """Write ``estimator`` with cloudpickle behind a JSON header, atomically."""
    payload = cloudpickle.dumps(estimator)
    header = dict(header, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    blob = MODEL_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(blob)

    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder or ".")
    atomic_write(path, write, fsync=True)
    return header


def read_model_header(path):
    """The JSON header of a model file, or None if it is missing or malformed.

    Reading the header runs no code: nothing is unpickled.
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(MODEL_MAGIC)) != MODEL_MAGIC:
                return None
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def load_model(path):
    """(header, estimator) from a model file, checking size and digest first.

    Loading unpickles the file, which can run arbitrary code: only load
    model files you trust. Returns None for a missing, truncated or corrupt file.
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(MODEL_MAGIC)) != MODEL_MAGIC:
                return None
            header = json.loads(f.readline())
            payload = f.read()
    except (OSError, ValueError):
        return None
    if len(payload) != header.get("size") or (
        hashlib.sha256(payload).hexdigest() != header.get("sha256")
    ):
        return None
    return header, cloudpickle.loads(payload)


def _update_estimator(dst, src):
    """Copy fitted state from ``src`` into ``dst``, keeping ``dst``'s objects."""
    for name, value in vars(src).items():
        current = getattr(dst, name, None)
        if (
            current is not None
            and type(current) is type(value)
            and hasattr(value, "get_params")
            and hasattr(value, "__dict__")
        ):
            _update_estimator(current, value)
        else:
            setattr(dst, name, value)


# ---------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------
class CheckpointWrapper(BaseWrapper):
    """Save transformed samples and the fitted estimator; load instead of redoing.

    Parameters
    ----------
    estimator : estimator object
        A sample-aware estimator, usually a `SampleWrapper`.
    features_dir : str or os.PathLike, default=None
        Where each transformed sample is saved as ``<features_dir>/[<hash_fn(key)>/]
        <key><extension>``. ``None`` turns feature checkpoints off.
    model_path : str or os.PathLike, default=None
        The file of the fitted estimator. ``None`` turns model checkpoints off.
    extension : str, default=None
        File extension of feature checkpoints (default ``".h5"``).
    save_func, load_func : callable, default=None
        ``save_func(data, path)`` and ``load_func(path)`` for data the default
        HDF5 format cannot hold. Validity is then recorded in a
        ``<file>.meta.json`` beside each file.
    sample_attribute : str, default=None
        Which attribute is checkpointed (default: the inner estimator's
        ``output_attribute``, else ``"data"``).
    hash_fn : callable, default=None
        ``hash_fn(key) -> str`` names a sub-folder per key, e.g.
        `samplepipe.hash_string` to spread a million files over 1,000 folders.
    attempts : int, default=10
        How often an I/O error (`OSError`) while saving is tried. Programming
        errors, a full disk and missing permissions are raised at once.
    force : bool, default=False
        Recompute and overwrite every checkpoint, and refit the model.

    Notes
    -----
    A checkpoint is valid when its HDF5 attribute ``samplepipe`` holds
    ``"<format version>:<fingerprint>:<key>"`` for this step. The fingerprint
    hashes the inner estimator's class and parameters (recursively) and, for a
    step that needs fitting, the digest of its fitted state. A stale, corrupt,
    truncated or foreign file is recomputed and overwritten, with one
    `CheckpointWarning`. Files are written to a temporary name and moved into
    place with ``os.replace``; temporary files of crashed writers are removed on
    the next write into their folder.

    The model file is a small JSON header (class, parameter fingerprint, library
    versions, size and SHA-256 of the payload) followed by a cloudpickle payload.
    ``fit`` loads it instead of fitting when the header matches this step's
    parameters and the payload is intact. **Loading a pickle runs code: only use
    a model_path you trust.**
    """

    def __init__(
        self,
        estimator,
        features_dir=None,
        model_path=None,
        extension=None,
        save_func=None,
        load_func=None,
        sample_attribute=None,
        hash_fn=None,
        attempts=10,
        force=False,
    ):
        self.estimator = estimator
        self.features_dir = features_dir
        self.model_path = model_path
        self.extension = extension
        self.save_func = save_func
        self.load_func = load_func
        self.sample_attribute = sample_attribute
        self.hash_fn = hash_fn
        self.attempts = attempts
        self.force = force

    # -- configuration -----------------------------------------------------
    def _validate_params(self):
        for name in ("features_dir", "model_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                msg = (
                    f"CheckpointWrapper got {name}={value!r}; it must be a path "
                    "(str or os.PathLike) or None."
                )
                raise TypeError(msg)
        if not isinstance(self.attempts, int) or self.attempts < 1:
            msg = (
                f"CheckpointWrapper got attempts={self.attempts!r}; it must be an "
                "int >= 1."
            )
            raise ValueError(msg)
        extension = resolve_option(self, "extension")
        if not isinstance(extension, str) or "/" in extension:
            msg = (
                f"CheckpointWrapper got extension={extension!r}; it must be a str "
                "such as '.h5' without '/'."
            )
            raise ValueError(msg)
        if self.hash_fn is not None and not callable(self.hash_fn):
            msg = (
                f"CheckpointWrapper got hash_fn={self.hash_fn!r}; it must be callable."
            )
            raise TypeError(msg)

    def _sample_attribute(self):
        if self.sample_attribute is not None:
            return self.sample_attribute
        from ._base import estimator_options

        declared = estimator_options(self.estimator)
        inner = getattr(self.estimator, "output_attribute", None)
        return inner or declared.get("output_attribute") or "data"

    def _funcs(self):
        save = resolve_option(self, "save_func")
        load = resolve_option(self, "load_func")
        if (save is None) != (load is None):
            msg = (
                "CheckpointWrapper got only one of save_func and load_func; give "
                "both or neither."
            )
            raise ValueError(msg)
        return save, load

    def _checkpoints_features(self):
        return self.features_dir is not None and bool(
            resolve_option(self, "checkpoint_features")
        )

    def checkpoint_path(self, key):
        """The checkpoint file of ``key`` (the key is checked first)."""
        check_key(key)
        parts = [os.fspath(self.features_dir)]
        if self.hash_fn is not None:
            parts.append(str(self.hash_fn(key)))
        return os.path.join(*parts, key + resolve_option(self, "extension"))

    # -- fingerprints ------------------------------------------------------
    def _fitted_digest(self):
        if not estimator_requires_fit(self.estimator):
            return None
        digest = getattr(self, "model_digest_", None)
        if digest is not None:
            return digest
        if self.model_path is not None:
            header = read_model_header(self.model_path)
            if header and header.get("params") == params_fingerprint(self.estimator):
                return header.get("sha256")
        return fitted_fingerprint(self.estimator)

    def fingerprint(self, upstream=None):
        """Hash of what produces this step's checkpoints (see Notes).

        ``upstream`` is the fingerprint of the step that produced the inputs
        (derived from the inputs by `transform`), so that a change upstream
        invalidates the checkpoints downstream.
        """
        return joblib.hash(
            (
                FORMAT_VERSION,
                params_fingerprint(self.estimator),
                self._sample_attribute(),
                self._fitted_digest(),
                upstream,
            )
        )

    # -- model -------------------------------------------------------------
    def _model_header(self):
        import sklearn

        return {
            "format": FORMAT_VERSION,
            "class": qualified_name(self.estimator),
            "params": params_fingerprint(self.estimator),
            "sklearn": sklearn.__version__,
            "cloudpickle": cloudpickle.__version__,
        }

    def load_model(self, data=None):
        """Load ``model_path`` into the wrapped estimator if it fits this step.

        Returns True when the model was loaded: the file is intact and was
        written by a step of the same class and parameters (and, when ``data``
        is given, fitted on training samples whose keys have that digest). The
        wrapped estimator objects are kept (references to them stay valid) and
        so are this step's parameters. Loading unpickles the file: only use a
        model_path you trust.
        """
        if self.model_path is None:
            return False
        header = read_model_header(self.model_path)
        if header is None or header.get("params") != params_fingerprint(self.estimator):
            return False
        if data is not None and header.get("data") not in (None, data):
            return False
        loaded = load_model(self.model_path)
        if loaded is None:
            return False
        header, model = loaded
        _update_estimator(self.estimator, model)
        self.model_digest_ = header["sha256"]
        return True

    def save_model(self, data=None):
        """Write the wrapped estimator to ``model_path`` atomically.

        ``data`` (the digest of the training keys) is recorded in the header.
        """
        header = self._model_header()
        if data is not None:
            header["data"] = data
        header = save_model(self.estimator, os.fspath(self.model_path), header)
        self.model_digest_ = header["sha256"]

    def fit(self, X, y=None, **fit_params):
        """Load the model checkpoint, or fit and save it.

        Returns
        -------
        self : CheckpointWrapper
        """
        self._validate_params()
        if not estimator_requires_fit(self.estimator):
            return self
        data = _training_digest(X)
        if not self.force and self.load_model(data=data):
            return self
        self.estimator.fit(X, y, **fit_params)
        if self.model_path is not None:
            self.save_model(data=data)
        else:
            self.model_digest_ = fitted_fingerprint(self.estimator)
        return self

    # -- features ----------------------------------------------------------
    def _save_one(self, data, path, metadata, save):
        folder = os.path.dirname(path)
        last = None
        for attempt in range(self.attempts):
            try:
                if os.path.isdir(path):
                    msg = (
                        f"CheckpointWrapper cannot write checkpoint {path!r}: a "
                        "folder of that name exists; remove it or change the key."
                    )
                    raise IsADirectoryError(errno.EISDIR, msg)
                os.makedirs(folder, exist_ok=True)
                if save is None:
                    atomic_write(path, lambda tmp: save_hdf5(data, tmp, metadata))
                else:
                    atomic_write(path, lambda tmp: save(data, tmp))
                st = os.stat(path)
                if save is not None:
                    side = {
                        "metadata": metadata,
                        "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns,
                    }
                    atomic_write(
                        _sidecar(path),
                        lambda tmp, side=side: _write_json(tmp, side),
                    )
                _remember(path, st, metadata)
                return st
            except OSError as exc:
                last = exc
                if exc.errno in _PERMANENT_ERRNOS or attempt + 1 == self.attempts:
                    break
                time.sleep(min(0.1 * 2**attempt, 2.0))
        msg = f"CheckpointWrapper could not write checkpoint {path!r}: {last}"
        raise OSError(getattr(last, "errno", None), msg) from last

    def _prepare_folder(self, folder, seen):
        if folder in seen:
            return
        seen.add(folder)
        root = os.path.realpath(os.fspath(self.features_dir))
        real = os.path.realpath(folder)
        if real != root and not real.startswith(root + os.sep):
            msg = (
                f"CheckpointWrapper refuses to write into {folder!r}: it resolves to "
                f"{real!r}, outside features_dir {root!r} (a symbolic link?)."
            )
            raise ValueError(msg)
        remove_stale_temporaries(folder)

    def transform(self, X):
        """Transform samples, loading valid checkpoints and computing the rest.

        Parameters
        ----------
        X : list of Sample or SampleSet

        Returns
        -------
        samples : list
            Samples whose checkpointed attribute loads lazily from its file, in
            the structure of ``X``; ``None`` where the estimator returned None.
        """
        if not is_sample_list(X):
            if isinstance(X, list | tuple) and len(X) == 0:
                return []
            return self.estimator.transform(X)
        self._validate_params()
        if not self._checkpoints_features():
            return self.estimator.transform(X)
        flat, sets = _flatten(X)
        outputs = self.transform_samples(flat)
        return _unflatten(outputs, sets)

    def transform_samples(self, samples, report=None):
        """`transform` for a flat list of samples; fills ``report`` if given.

        ``report`` (a dict) receives ``computed``, ``loaded``, ``recomputed``,
        ``fingerprint`` and ``files`` (``(path, size, mtime_ns)`` per sample,
        None for None outputs).
        """
        self._validate_params()
        keys = sample_keys(samples)
        paths = [self.checkpoint_path(k) for k in keys]
        save, load = self._funcs()
        fingerprint = self.fingerprint(upstream_fingerprint(samples))
        metas = [format_metadata(fingerprint, k) for k in keys]
        custom = save is not None
        statuses = [None] * len(samples)
        todo, bad = [], {}
        for i, (path, meta) in enumerate(zip(paths, metas)):
            status, st = (
                ("missing", None)
                if self.force
                else checkpoint_status(path, meta, custom)
            )
            if status == "valid":
                statuses[i] = st
            else:
                todo.append(i)
                if status != "missing":
                    bad[status] = bad.get(status, 0) + 1
        if bad:
            detail = ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))
            warnings.warn(
                f"CheckpointWrapper({self._name()}) recomputes {sum(bad.values())} "
                f"checkpoint(s) in {os.fspath(self.features_dir)!r}: {detail} "
                "(stale: made by other parameters or another fitted model; "
                "corrupt: unreadable; foreign: holds another key).",
                CheckpointWarning,
                stacklevel=2,
            )
        attribute = self._sample_attribute()
        computed = 0
        if todo:
            inputs = [samples[i] for i in todo]
            outputs = self.estimator.transform(inputs)
            if len(outputs) != len(inputs):
                msg = (
                    f"{self._name()}.transform returned {len(outputs)} samples for "
                    f"{len(inputs)} inputs."
                )
                raise RuntimeError(msg)
            folders = set()
            for i, out in zip(todo, outputs):
                if out is None:
                    continue
                if not isinstance(out, Sample):
                    msg = (
                        f"CheckpointWrapper expects the wrapped estimator to return "
                        f"samples, got {type(out).__name__}; wrap it in "
                        "SampleWrapper first (wrap(['sample', 'checkpoint'], ...))."
                    )
                    raise TypeError(msg)
                value = getattr(out, attribute)
                if value is None:
                    continue
                self._prepare_folder(os.path.dirname(paths[i]), folders)
                statuses[i] = self._save_one(value, paths[i], metas[i], save)
                computed += 1
        results = []
        for s, path, meta, st in zip(samples, paths, metas, statuses):
            if st is None:
                results.append(None)
                continue
            loader = CheckpointLoader(path, meta, st.st_size, st.st_mtime_ns, load)
            if attribute == "data":
                results.append(DelayedSample(loader, parent=s))
            else:
                results.append(_with_delayed(s, attribute, loader))
        if report is not None:
            report["computed"] = computed
            report["loaded"] = len(samples) - len(todo)
            report["recomputed"] = sum(bad.values())
            report["fingerprint"] = fingerprint
            report["files"] = [
                (p, st.st_size, st.st_mtime_ns) if st is not None else None
                for p, st in zip(paths, statuses)
            ]
        return results

    @available_if(_estimator_has("transform"))
    def fit_transform(self, X, y=None, **fit_params):
        """Fit (or load the model), then transform with checkpoints."""
        return self.fit(X, y, **fit_params).transform(X)

    @available_if(_estimator_has("predict"))
    def predict(self, X, **kwargs):
        """Predict through the wrapped estimator (not checkpointed)."""
        return self.estimator.predict(X, **kwargs)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X, **kwargs):
        """Class probabilities through the wrapped estimator (not checkpointed)."""
        return self.estimator.predict_proba(X, **kwargs)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X, **kwargs):
        """Decision function through the wrapped estimator (not checkpointed)."""
        return self.estimator.decision_function(X, **kwargs)

    @available_if(_estimator_has("score"))
    def score(self, X, y=None, **kwargs):
        """Score through the wrapped estimator."""
        return self.estimator.score(X, y, **kwargs)

    # -- housekeeping ------------------------------------------------------
    def iter_checkpoints(self, upstream=None):
        """Yield ``(path, status, size)`` for every file under ``features_dir``.

        ``status`` is ``valid``, ``stale``, ``corrupt``, ``foreign`` (the key
        inside does not match the file name) or ``temporary`` (left by a
        crashed writer, or being written right now).
        """
        if self.features_dir is None:
            return
        save, load = self._funcs()
        custom = save is not None
        extension = resolve_option(self, "extension")
        fingerprint = self.fingerprint(upstream)
        root = os.fspath(self.features_dir)
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                size = os.path.getsize(path)
                if is_temporary_file(name):
                    yield path, "temporary", size
                    continue
                if not name.endswith(extension) or (
                    custom and name.endswith(".meta.json")
                ):
                    continue
                rel = os.path.relpath(path, root)[: -len(extension)].replace(
                    os.sep, "/"
                )
                if self.hash_fn is not None:
                    rel = rel.split("/", 1)[-1]
                status, _ = checkpoint_status(
                    path, format_metadata(fingerprint, rel), custom
                )
                yield path, status, size

    def remove_checkpoints(
        self,
        statuses=("stale", "corrupt", "foreign", "temporary"),
        dry_run=False,
        upstream=None,
    ):
        """Remove files of the given statuses; return ``[(path, status, size)]``."""
        removed = []
        for path, status, size in list(self.iter_checkpoints(upstream)):
            if status in statuses:
                removed.append((path, status, size))
                if not dry_run:
                    remove_checkpoint_file(path)
        return removed


def _training_digest(X):
    """Digest of the training samples: their keys and their lineage.

    None if the samples have no keys. The lineage (`upstream_fingerprint`)
    changes when a step before this one changes, so a model fitted on the old
    outputs of that step is not reused.
    """
    if not is_sample_list(X):
        return None
    flat, _ = _flatten(X)
    keys = [getattr(s, "key", None) for s in flat]
    if any(not isinstance(k, str) for k in keys):
        return None
    return keys_digest([*keys, f"upstream={upstream_fingerprint(flat)}"])


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _with_delayed(sample, attribute, loader):
    """A copy of ``sample`` whose ``attribute`` loads lazily through ``loader``."""
    if isinstance(sample, DelayedSample):
        new = DelayedSample(sample._load, parent=sample)
    else:
        new = DelayedSample.from_sample(sample)
    if attribute in vars(new):
        object.__delattr__(new, attribute)
    new._delayed_attributes[attribute] = loader
    return new
