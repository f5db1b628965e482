"""Checkpoint storage: keys, identities, the HDF5 format, model files, filesystems.

This is the contract the wrappers, tasks, flows and command line use; the
modules behind it hold one concern each:

``keys``
    key and step-name rules, key digests, `hash_string` buckets.
``identity``
    the identity of code, parameters, fitted state and inputs; `Identity`.
``formats``
    checkpoint file formats registered by name (`Format`, `register_format`):
    ``"hdf5"``, ``"custom"`` and ``"npy"``.
``layouts``
    where a step's checkpoints live, registered by name (`Layout`,
    `register_layout`): ``"files"`` (`FilesLayout`) and ``"shards"``
    (`ShardsLayout`).
``shards``
    the shard files of the ``"shards"`` layout, their index and loaders.
``hdf5``
    the default file format (`save_hdf5`, `load_hdf5`).
``npy``
    the ``"npy"`` format: NumPy ``.npy`` files (`NpyFormat`).
``status``
    what was found at a checkpoint (`Status`: ``"valid"``, ``"stale"``, ...).
``report``
    what a batch's transform did (`TransformReport`, `ShardEntry`).
``checkpoints``
    per-sample checkpoint files: status, atomic writing, `CheckpointLoader`.
``models``
    model files (JSON header + cloudpickle payload).
``files``
    atomic writes, temporary files, file stamps, the validation cache.
``journal``
    validated files recorded across processes (`journal.JOURNAL`), outside
    ``features_dir``: a new process trusts a file from one stat.
``fs``
    where files live: local paths and fsspec URLs (`filesystem`, `stamp_of`).

A *location* (``features_dir``, ``model_path``) is a local path or an fsspec
URL; functions that take one also take ``storage_options``, passed to fsspec.
"""

from .checkpoints import (
    CheckpointLoader,
    CorruptCheckpointError,
    UnknownFileError,
    read_record,
    sidecar,
)
from .checkpoints import check as checkpoint_status
from .checkpoints import remove as remove_checkpoint_file
from .files import (
    VALIDATED,
    MissingStoreError,
    Stamp,
    is_permanent,
    is_temporary_file,
    stamp,
)
from .formats import (
    CustomFormat,
    Format,
    HDF5Format,
    register_format,
    registered_formats,
)
from .fs import (
    FileSystem,
    check_location,
    filesystem,
    is_local,
    join_location,
    location_root,
    normalize_location,
    relative_location,
    stamp_of,
)
from .hdf5 import load_hdf5, save_hdf5
from .identity import (
    FORMAT_VERSION,
    Identity,
    Record,
    code_identity,
    combine,
    estimator_identity,
    fitted_digest,
    state_digest,
    value_digest,
)
from .keys import (
    check_key,
    check_step_name,
    hash_string,
    is_url,
    keys_digest,
    sample_keys,
)
from .layouts import (
    FilesLayout,
    Layout,
    LayoutContext,
    ShardsLayout,
    format_funcs,
    get_layout,
    register_layout,
    registered_layouts,
)
from .models import ModelWarning, load_model, read_model_header, save_model
from .npy import NpyFormat
from .report import ShardEntry, TransformReport
from .status import Status

__all__ = [
    "FORMAT_VERSION",
    "VALIDATED",
    "CheckpointLoader",
    "CorruptCheckpointError",
    "CustomFormat",
    "FileSystem",
    "FilesLayout",
    "Format",
    "HDF5Format",
    "Identity",
    "Layout",
    "LayoutContext",
    "MissingStoreError",
    "ModelWarning",
    "NpyFormat",
    "Record",
    "ShardEntry",
    "ShardsLayout",
    "Stamp",
    "Status",
    "TransformReport",
    "UnknownFileError",
    "check_key",
    "check_location",
    "check_step_name",
    "checkpoint_status",
    "code_identity",
    "combine",
    "estimator_identity",
    "filesystem",
    "fitted_digest",
    "format_funcs",
    "get_layout",
    "hash_string",
    "is_local",
    "is_permanent",
    "is_temporary_file",
    "is_url",
    "join_location",
    "keys_digest",
    "load_hdf5",
    "load_model",
    "location_root",
    "normalize_location",
    "read_model_header",
    "read_record",
    "register_format",
    "register_layout",
    "registered_formats",
    "registered_layouts",
    "relative_location",
    "remove_checkpoint_file",
    "sample_keys",
    "save_hdf5",
    "save_model",
    "sidecar",
    "stamp",
    "stamp_of",
    "state_digest",
    "value_digest",
]
