"""What samplepipe found at a checkpoint: the `Status` of a file or an entry.

The statuses are defined once, here; `samplepipe.storage.checkpoints` (files)
and `samplepipe.storage.shards` (shards) describe what each means for their
files. A `Status` is a ``str``: it equals its value (``Status.VALID ==
"valid"``), and prints, formats, reprs and serialises to JSON as the bare
value, so output and code written against the strings are unchanged.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Status"]


class Status(str, Enum):
    """The status of a checkpoint file, or of an entry of a shard.

    Judged for an identity (`samplepipe.storage.checkpoint_status`, the
    layouts, `CheckpointWrapper.iter_checkpoints`):

    ``VALID``
        written by samplepipe for this identity; its payload checksum matches.
    ``MISSING``
        no file (no entry).
    ``STALE``
        a samplepipe checkpoint of this key made by another step, parameters,
        fitted model or input (or, in a shard, superseded by a newer entry):
        never reused, safe to recompute and remove.
    ``FOREIGN``
        a samplepipe checkpoint holding another key.
    ``CORRUPT``
        holds nothing readable, or fails its checksum: recomputed.
    ``UNKNOWN``
        a readable file samplepipe did not write: never overwritten, never
        removed.

    Listed in a folder, besides: ``TEMPORARY`` (left by a crashed writer)
    and ``WRITING`` (a temporary file of a live writer).

    Read before judging (`samplepipe.storage.read_record`, `Format.read_record`):
    ``OK`` (a verified samplepipe record; judged next), or ``MISSING``,
    ``CORRUPT``, ``UNKNOWN``; ``CHANGED`` when an object of a store kept
    changing while it was read.

    Examples
    --------
    >>> from samplepipe.storage import Status
    >>> Status.VALID == "valid", Status("stale") is Status.STALE
    (True, True)
    >>> print(Status.CORRUPT)
    corrupt
    >>> f"{Status.FOREIGN:>8}", [Status.MISSING]
    (' foreign', ['missing'])
    """

    VALID = "valid"
    MISSING = "missing"
    STALE = "stale"
    FOREIGN = "foreign"
    CORRUPT = "corrupt"
    UNKNOWN = "unknown"
    TEMPORARY = "temporary"
    WRITING = "writing"
    OK = "ok"
    CHANGED = "changed"

    # The bare value everywhere a user sees it: the statuses were plain strings
    # up to 0.5.0, and messages, tables, JSON and doctests print them so.
    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return self.value.__format__(format_spec)

    def __repr__(self) -> str:
        return repr(self.value)
