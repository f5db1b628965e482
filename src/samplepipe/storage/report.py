"""What a layout's ``transform`` did with a batch: `TransformReport`, `ShardEntry`.

Filled by the layouts (`Layout.transform`), returned through
`CheckpointWrapper.transform_samples(..., report=...)`, read by the flows'
manifests. Per-sample values are columns (one list each), not an object per
sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from .files import Stamp

__all__ = ["ShardEntry", "TransformReport"]


class ShardEntry(NamedTuple):
    """Where a sample's checkpoint lies in a shard, and its payload's record.

    The entry ``row`` of dataset ``data/<group>``; ``checksum`` and ``kind``
    are those of the entry's record (see `samplepipe.storage.shards`).
    """

    group: int
    row: int
    checksum: str
    kind: str


# the keys of the dict a report was up to 0.5.0 that are not fields
_LEGACY_KEYS = ("files",)


@dataclass
class TransformReport:
    """What one `CheckpointWrapper.transform_samples` call did.

    Give an empty one as ``report=`` and read its attributes afterwards:

    >>> from samplepipe.storage import TransformReport
    >>> report = TransformReport()
    >>> report.computed, report.loaded, report.failed
    (0, 0, 0)

    Attributes
    ----------
    computed : int
        Samples computed and written.
    loaded : int
        Samples whose valid checkpoint was reused.
    recomputed : int
        Of ``computed``, samples whose checkpoint was there but stale, corrupt
        or foreign.
    failed : int
        Samples without a checkpoint: their output is None (the estimator
        failed them, or their input had failed).
    step : str or None
        The step identity of the checkpoints (None for an empty batch).
    inputs : list of str
        Each sample's input identity.
    paths : list of str or None
        Each sample's checkpoint file (a shard in the ``"shards"`` layout).
    stamps : list of Stamp or None
        Each sample's checkpoint file's `Stamp` as written or validated; None
        for a sample without a checkpoint (failed).
    records : list of str or None, or None
        The ``"files"`` layout: each file's verified record (None when
        unknown, e.g. a custom ``load_func`` reads it).
    entries : list of ShardEntry or None, or None
        The ``"shards"`` layout: each sample's `ShardEntry` in its shard.

    Notes
    -----
    Up to 0.5.0 the report was a dict; a dict given as ``report=`` still
    receives the same keys (`as_dict`). Reading or writing a report's fields
    as ``report["computed"]`` works, with a `DeprecationWarning` naming the
    attribute (``report.computed``).
    """

    computed: int = 0
    loaded: int = 0
    recomputed: int = 0
    failed: int = 0
    step: str | None = None
    inputs: list[str | None] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    stamps: list[Stamp | None] = field(default_factory=list)
    records: list[str | None] | None = None
    entries: list[ShardEntry | None] | None = None

    def __len__(self) -> int:
        return len(self.stamps)

    @property
    def files(self) -> list[tuple[Any, ...] | None]:
        """Each sample's ``(path, stamp)``, ``(path, stamp, entry)`` in a shard,
        or None (failed): the ``"files"`` of a report before 0.6."""
        entries = self.entries
        return [
            None if st is None else (p, st) if entries is None else (p, st, entries[i])
            for i, (p, st) in enumerate(zip(self.paths, self.stamps))
        ]

    def as_dict(self) -> dict[str, Any]:
        """The report as the dict of samplepipe up to 0.5.0.

        Keys ``computed``, ``loaded``, ``recomputed``, ``failed``, ``step``,
        ``inputs``, ``files`` (see `files`) and, in the ``"files"`` layout,
        ``records``.
        """
        out: dict[str, Any] = {
            "computed": self.computed,
            "loaded": self.loaded,
            "recomputed": self.recomputed,
            "failed": self.failed,
            "step": self.step,
            "inputs": self.inputs,
            "files": self.files,
        }
        if self.records is not None:
            out["records"] = self.records
        return out

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> TransformReport:
        """The report of a dict of samplepipe up to 0.5.0 (see `as_dict`)."""
        out = cls(**{f.name: report[f.name] for f in fields(cls) if f.name in report})
        if "files" in report:
            out._set_files(report["files"])
        return out

    @classmethod
    def failed_sample(cls) -> TransformReport:
        """The report of one sample that failed (no checkpoint)."""
        return cls(failed=1, inputs=[None], paths=[None], stamps=[None])

    def extend(self, other: TransformReport) -> None:
        """Append ``other``, the report of the samples that follow."""
        n, m = len(self), len(other)
        self.computed += other.computed
        self.loaded += other.loaded
        self.recomputed += other.recomputed
        self.failed += other.failed
        self.step = self.step or other.step
        self.inputs += other.inputs
        self.paths += other.paths
        self.stamps += other.stamps
        if self.records is not None or other.records is not None:
            self.records = (self.records or [None] * n) + (other.records or [None] * m)
        if self.entries is not None or other.entries is not None:
            self.entries = (self.entries or [None] * n) + (other.entries or [None] * m)

    def fill(self, other: TransformReport) -> None:
        """Take every field of ``other`` (a layout fills the caller's report)."""
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))

    # -- the dict spelling of 0.5.0, deprecated ------------------------------
    def _deprecated(self, key: str, how: str) -> None:
        if key not in _LEGACY_KEYS and key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        spelling = f"report.{key}"
        warnings.warn(
            f"{how} a TransformReport as report[{key!r}] is deprecated since "
            f"samplepipe 0.6 and will stop working; use {spelling}.",
            DeprecationWarning,
            stacklevel=3,
        )

    def __getitem__(self, key: str) -> Any:
        self._deprecated(key, "reading")
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._deprecated(key, "filling")
        if key == "files":
            self._set_files(value)
        else:
            setattr(self, key, value)

    def _set_files(self, value: Sequence[Any]) -> None:
        self.paths = [None if f is None else f[0] for f in value]
        self.stamps = [None if f is None else f[1] for f in value]
        if any(f is not None and len(f) > 2 for f in value):
            self.entries = [
                None if f is None or len(f) < 3 else ShardEntry._make(f[2])
                for f in value
            ]
