"""Checkpoint storage: keys, identities, the HDF5 format, model files, local files.

This is the contract the wrappers, tasks, flows and command line use; the
modules behind it hold one concern each:

``keys``
    key and step-name rules, key digests, `hash_string` buckets.
``identity``
    the identity of code, parameters, fitted state and inputs; `Identity`.
``hdf5``
    the default file format (`save_hdf5`, `load_hdf5`).
``checkpoints``
    per-sample checkpoint files: status, atomic writing, `CheckpointLoader`.
``models``
    model files (JSON header + cloudpickle payload).
``files``
    atomic writes, temporary files, file stamps, the validation cache.
"""

from .checkpoints import (
    CheckpointLoader,
    CorruptCheckpointError,
    UnknownFileError,
    read_record,
    sidecar,
)
from .checkpoints import remove as remove_checkpoint_file
from .checkpoints import status as checkpoint_status
from .files import VALIDATED, Stamp, is_permanent, is_temporary_file, stamp
from .hdf5 import load_hdf5, save_hdf5
from .identity import (
    FORMAT_VERSION,
    Identity,
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
from .models import ModelWarning, load_model, read_model_header, save_model

__all__ = [
    "FORMAT_VERSION",
    "VALIDATED",
    "CheckpointLoader",
    "CorruptCheckpointError",
    "Identity",
    "ModelWarning",
    "Stamp",
    "UnknownFileError",
    "check_key",
    "check_step_name",
    "checkpoint_status",
    "code_identity",
    "combine",
    "estimator_identity",
    "fitted_digest",
    "hash_string",
    "is_permanent",
    "is_temporary_file",
    "is_url",
    "keys_digest",
    "load_hdf5",
    "load_model",
    "read_model_header",
    "read_record",
    "remove_checkpoint_file",
    "sample_keys",
    "save_hdf5",
    "save_model",
    "sidecar",
    "stamp",
    "state_digest",
    "value_digest",
]
