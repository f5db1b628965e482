"""The ``"npy"`` checkpoint format: NumPy's own ``.npy`` files, one per sample.

Each file is what ``np.save`` writes and ``np.load(..., allow_pickle=False)``
reads, so any NumPy user can open it; samplepipe's record (identity, SHA-256
of the file, kind ``npy``) is in a ``<file>.meta.json`` sidecar, as for the
custom format (see `samplepipe.storage.formats`). Only arrays of a dtype that
is not ``object`` are stored (no pickles in checkpoint files).

Examples
--------
>>> import tempfile
>>> import numpy as np
>>> from samplepipe.storage import Identity
>>> from samplepipe.storage.npy import NpyFormat
>>> path = tempfile.mkdtemp() + "/s1.npy"
>>> _ = NpyFormat().write(path, np.arange(3, dtype="int16"), Identity("st", "", "s1"))
>>> NpyFormat().read(path)
array([0, 1, 2], dtype=int16)
>>> np.load(path)  # a plain .npy file
array([0, 1, 2], dtype=int16)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .formats import Format, register_format

__all__ = ["NpyFormat"]

NPY_FORMAT_VERSION = 1  # bump when what a file holds for a value changes


class NpyFormat(Format):
    """NumPy ``.npy`` files, one per sample; arrays of non-object dtype only.

    ``CheckpointWrapper(format="npy")`` writes ``<key>.npy`` and its
    ``<key>.npy.meta.json`` record; a value comes back with its dtype and
    shape (a 0-d array for a NumPy scalar).
    """

    name = "npy"
    extension = ".npy"

    def identity(self) -> str:  # noqa: D102 - see Format.identity
        return f"npy:{NPY_FORMAT_VERSION}"

    def check_value(self, value: Any) -> None:
        """``TypeError`` unless ``value`` is an array (or NumPy scalar) that
        ``.npy`` stores without pickling."""
        if not isinstance(value, np.ndarray | np.generic):
            msg = (
                f"the npy format stores NumPy arrays, got {type(value).__name__}; "
                "use format='hdf5' or save_func/load_func for other values."
            )
            raise TypeError(msg)
        if value.dtype.hasobject:
            msg = (
                f"the npy format stores arrays of non-object dtype, got dtype "
                f"{value.dtype}; use save_func/load_func for such arrays."
            )
            raise TypeError(msg)

    def save(self, value: Any, path: str) -> None:  # noqa: D102
        # a file object: np.save would add ".npy" to a temporary name
        with open(path, "wb") as f:
            np.save(f, value, allow_pickle=False)

    def load(self, path: str) -> Any:  # noqa: D102
        with open(path, "rb") as f:
            return np.load(f, allow_pickle=False)


register_format("npy", NpyFormat)
