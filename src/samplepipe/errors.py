"""Every exception and warning class of samplepipe, in one place.

Each class is also importable from the module that raises it (for example
``samplepipe.storage.UnknownFileError`` or ``samplepipe.locks.LockTimeoutError``);
those names are this module's classes, not copies, so ``except`` clauses work
with either spelling. This module imports nothing but the standard library.

Examples
--------
>>> from samplepipe.errors import UnknownFileError
>>> from samplepipe.storage import UnknownFileError as FromStorage
>>> FromStorage is UnknownFileError
True
>>> issubclass(UnknownFileError, FileExistsError)
True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "ChangedWhileReading",
    "CheckpointWarning",
    "ChecksumError",
    "CommandError",
    "CorruptCheckpointError",
    "LockTimeoutError",
    "LostLogsWarning",
    "MissingStoreError",
    "ModelWarning",
    "PipelineRunError",
    "SampleFailures",
    "ServerError",
    "SourceError",
    "ShardError",
    "StaleManifestError",
    "UnknownFileError",
    "UnsafeLockFolderError",
    "UnsupportedValueError",
]


# ---------------------------------------------------------------------------
# storage: checkpoint files, formats, models
# ---------------------------------------------------------------------------
class UnknownFileError(FileExistsError):
    """A readable file that samplepipe did not write is in a checkpoint's place.

    Raised by `samplepipe.storage.checkpoints` (also importable from there).
    """


class CorruptCheckpointError(RuntimeError):
    """A checkpoint changed since it was validated and is no longer valid.

    Raised by `samplepipe.storage.checkpoints` (also importable from there).
    """


class MissingStoreError(FileNotFoundError):
    """The bucket or folder to write into does not exist; retrying cannot help.

    Raised by `samplepipe.storage.files` (also importable from there).
    """


class ChangedWhileReading(OSError):
    """A file was replaced while it was being read.

    Raised by `samplepipe.storage.fs` (also importable from there).
    """


class UnsupportedValueError(TypeError):
    """The default format cannot store this value exactly.

    Raised by `samplepipe.storage.hdf5` (also importable from there).
    """


class ChecksumError(ValueError):
    """A payload does not match the checksum of its record.

    Raised by `samplepipe.storage.hdf5` (also importable from there).
    """


class ShardError(ValueError):
    """A shard file that cannot be read as a samplepipe shard.

    Raised by `samplepipe.storage.shards` (also importable from there).
    """


class ModelWarning(UserWarning):
    """A model file could not be used and the step is fitted again.

    Issued by `samplepipe.storage.models` (also importable from there).
    """


# ---------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------
class CheckpointWarning(UserWarning):
    """Checkpoints were found stale or corrupt and are recomputed.

    Silence with ``warnings.simplefilter("ignore", samplepipe.CheckpointWarning)``.
    """


# ---------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------
class LockTimeoutError(TimeoutError):
    """A lock stayed held by a live holder for longer than ``max_wait``.

    Raised by `samplepipe.locks` (also importable from there).
    """


class UnsafeLockFolderError(ValueError):
    """The lock folder, or a file in it, could be controlled by someone else.

    Raised by `samplepipe.locks` (also importable from there).
    """


# ---------------------------------------------------------------------------
# tasks, flows, server, command line
# ---------------------------------------------------------------------------
class StaleManifestError(ValueError):
    """A cached manifest names files that changed or disappeared since.

    Raised by `samplepipe.tasks` (also importable from there).
    """


class SampleFailures(RuntimeError):
    """Some samples of a batch failed; every other sample was checkpointed.

    ``failures`` lists ``[key, error]`` pairs in input order. Raised by
    `samplepipe.tasks` (also importable from there).
    """

    def __init__(self, msg: str, failures: list[list[str]]) -> None:
        super().__init__(msg)
        self.failures = failures


class PipelineRunError(RuntimeError):
    """A step of a flow failed; ``step`` names it.

    ``failures`` lists ``(key, error)`` of the samples that failed, in input
    order, when the step failed on individual samples. Raised by
    `samplepipe.flows` (also importable from there).
    """

    def __init__(
        self, msg: str, step: str, failures: Iterable[Any] | None = None
    ) -> None:
        super().__init__(msg)
        self.step = step
        self.failures = list(failures or [])


class SourceError(RuntimeError):
    """A sample source raised while a flow read it; the message names the batch.

    Raised by `samplepipe.sources` (the flows report it as `PipelineRunError`,
    with this as its cause).
    """


class ServerError(RuntimeError):
    """The Prefect API could not be reached or started.

    Raised by `samplepipe.server` (also importable from there).
    """


class LostLogsWarning(UserWarning):
    """Run logs of the block were not stored by its Prefect API.

    Issued by `samplepipe.server` (also importable from there).
    """


class CommandError(Exception):
    """A command stops: ``main`` prints the message and exits with ``code``.

    Raised by `samplepipe.cli` (also importable from there).
    """

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code
