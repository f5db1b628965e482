"""Model files: a JSON header, then the estimator pickled with cloudpickle.

The header says, without unpickling anything, which step wrote the model
(code and parameter identity), the digest of its fitted state, what it was
fitted on and the library versions. Loading the payload unpickles it, which
can run arbitrary code: only load model files you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import cloudpickle

from ..errors import ModelWarning as ModelWarning
from .files import atomic_write, remove_stale_temporaries
from .fs import filesystem, location_root

MODEL_MAGIC = b"samplepipe-model\n"
MODEL_FORMAT = 2


def save_model(
    estimator: Any,
    path: str,
    header: dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``estimator`` behind ``header`` to ``path`` atomically (with fsync).

    ``path`` may be an fsspec URL (``storage_options`` go to its filesystem):
    the model is then one PUT on an object store. Returns the header as
    written (with the payload's size and SHA-256).
    """
    payload = cloudpickle.dumps(estimator)
    header = dict(
        header,
        model_format=MODEL_FORMAT,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    blob = MODEL_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload
    path = location_root(path)
    fs = filesystem(path, storage_options)
    if not fs.local:
        folder = fs.dirname(path)
        fs.makedirs(folder)
        fs.remove_stale_temporaries(folder)
        fs.write_bytes(path, blob)
        return header

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(blob)

    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder or ".")
    atomic_write(path, write, fsync=True)
    return header


def read_model_header(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The JSON header of a model file, or None if it is missing or malformed.

    Reading the header runs no code: nothing is unpickled. At a URL, only
    the first bytes of the object are read (range requests).
    """
    root = location_root(path)
    fs = filesystem(root, storage_options)
    if not fs.local:
        return _stored_header(root, fs)
    try:
        with open(root, "rb") as f:
            if f.read(len(MODEL_MAGIC)) != MODEL_MAGIC:
                return None
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return _checked_header(header)


def _checked_header(header: Any) -> dict[str, Any] | None:
    if not isinstance(header, dict) or header.get("model_format") != MODEL_FORMAT:
        return None
    return header


def _stored_header(path: str, fs: Any) -> dict[str, Any] | None:
    size = 1 << 16
    while True:
        try:
            head = fs.read_range(path, 0, size)
        except (OSError, ValueError):
            return None
        if not head.startswith(MODEL_MAGIC):
            return None
        end = head.find(b"\n", len(MODEL_MAGIC))
        if end >= 0 or len(head) < size:
            line = head[len(MODEL_MAGIC) : end if end >= 0 else len(head)]
            break
        size *= 4
    try:
        return _checked_header(json.loads(line))
    except ValueError:
        return None


def load_model(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Any] | None:
    """``(header, estimator)`` from a model file, checking size and digest first.

    Loading unpickles the file, which can run arbitrary code: only load model
    files you trust. Returns None for a missing, truncated or corrupt file, and
    for one that cannot be unpickled any more (a module that is gone, an
    incompatible library upgrade), with a `ModelWarning` in that last case.
    """
    root = location_root(path)
    fs = filesystem(root, storage_options)
    try:
        if fs.local:
            with open(root, "rb") as f:
                if f.read(len(MODEL_MAGIC)) != MODEL_MAGIC:
                    return None
                header = json.loads(f.readline())
                payload = f.read()
        else:
            blob = fs.read_bytes(root)
            if not blob.startswith(MODEL_MAGIC):
                return None
            line, _, payload = blob[len(MODEL_MAGIC) :].partition(b"\n")
            header = json.loads(line)
    except (OSError, ValueError):
        return None
    header = _checked_header(header)
    if header is None:
        return None
    if len(payload) != header.get("size") or (
        hashlib.sha256(payload).hexdigest() != header.get("sha256")
    ):
        return None
    try:
        model = cloudpickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means refit
        warnings.warn(
            f"The model file {os.fspath(path)!r} cannot be unpickled any more "
            f"({type(exc).__name__}: {exc}); the step is fitted again. Silence "
            "with warnings.simplefilter('ignore', samplepipe.ModelWarning).",
            ModelWarning,
            stacklevel=3,
        )
        return None
    return header, model


def update_estimator(dst: Any, src: Any) -> None:
    """Copy fitted state from ``src`` into ``dst``, keeping ``dst``'s objects."""
    for name, value in vars(src).items():
        current = getattr(dst, name, None)
        if (
            current is not None
            and type(current).__qualname__ == type(value).__qualname__
            and hasattr(value, "get_params")
            and hasattr(value, "__dict__")
        ):
            update_estimator(current, value)
        else:
            setattr(dst, name, value)
