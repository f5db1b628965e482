"""A batch's manifest: what one transform task run wrote, as columns.

A manifest names, for each sample of a batch, the checkpoint it was written
to (a file, or an entry of a shard), that file's stamp (size, modification
time, inode, change time), the sample's input identity and the payload's
checksum and kind. It is the persisted result of the task run (Prefect's
cache), what the next step of the batch reads its inputs from, and what the
flow's lazy outputs build samples from.

Columns, not one object per sample: keys, input identities, checksums and
kinds are each one ``"\\n"``-joined string (keys and digests hold no control
characters), the files a batch names are listed once each with their stamps,
and the per-sample file index and shard location are NumPy arrays. A manifest
holds about 100 bytes per sample, in a handful of Python objects.

``digest`` chains batches: it hashes the step's identity and each sample's key
and input identity (the identity of its output, in short), so the next step's
cache key is built from it without looking at one sample.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import StaleManifestError
from .storage import (
    FORMAT_VERSION,
    CheckpointLoader,
    FilesLayout,
    Identity,
    Record,
    ShardsLayout,
    Stamp,
    TransformReport,
    check_key,
    filesystem,
    format_funcs,
    get_layout,
    is_url,
    join_location,
    location_root,
    normalize_location,
    relative_location,
    stamp_of,
)
from .storage.layouts import gc_paused
from .storage.shards import DATA, ShardLoader
from .wrappers import failed_output, lazy_output

if TYPE_CHECKING:
    from .wrappers import CheckpointWrapper

MANIFEST_FORMAT = 4  # 4: columns, chained digest; 3: files entries with checksums
_MAGIC = b"samplepipe-manifest-4\n"
_DIGEST_SIZE = 16  # bytes of a chain digest (BLAKE2b), as the storage's digests


def _joined(values: Sequence[str | None]) -> str:
    return "\n".join("" if v is None else v for v in values)


def _split(text: str, n: int) -> list[str]:
    if n == 0:
        return []
    parts = text.split("\n")
    if len(parts) != n:
        msg = f"manifest column of {len(parts)} values for {n} samples"
        raise StaleManifestError(msg)
    return parts


def layout_kind(step: CheckpointWrapper) -> str:
    """How a manifest records a step's checkpoints: ``"shards"`` or ``"files"``.

    A layout given as an instance or registered under another name counts as
    the built-in layout it extends; the flows take no other.
    """
    layout = get_layout(step.layout, "CheckpointWrapper")
    if isinstance(layout, ShardsLayout):
        return "shards"
    if isinstance(layout, FilesLayout):
        return "files"
    msg = (
        f"the flows record checkpoints of layouts built on FilesLayout or "
        f"ShardsLayout; a step has layout={step.layout!r} (use it with "
        "CheckpointWrapper directly)."
    )
    raise ValueError(msg)


def layout_token(step: CheckpointWrapper) -> str:
    """A step's layout in a task's cache key: its name, or an instance's class."""
    if isinstance(step.layout, str):
        return step.layout
    cls = type(step.layout)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(eq=False)
class BatchManifest:
    """The checkpoints of one batch through one step (see the module docs)."""

    step: str
    start: int
    root: str
    identity: str | None
    layout: str
    keys: str
    inputs: str
    names: list[str]
    stamps: np.ndarray  # (len(names), 4) int64
    name_of: np.ndarray  # (n,) int32; -1: the sample failed
    rows: np.ndarray | None  # (n, 2) int64 (group, row) in the shard; None: files
    checksums: str
    kinds: str
    computed: int = 0
    loaded: int = 0
    failed: int = 0
    errors: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    attribute: str = "data"
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = self.chain_digest()

    def __len__(self) -> int:
        return len(self.name_of)

    @property
    def nbytes(self) -> int:
        """About the bytes held: texts, arrays and names (no fixed overhead)."""
        texts = (self.keys, self.inputs, self.checksums, self.kinds, *self.names)
        arrays = (self.stamps, self.name_of, self.rows)
        return sum(map(len, texts)) + sum(a.nbytes for a in arrays if a is not None)

    # -- building ----------------------------------------------------------
    @classmethod
    @gc_paused()  # a few acyclic objects per sample
    def from_report(
        cls,
        report: TransformReport | Mapping[str, Any],
        keys: Sequence[str],
        *,
        step: str,
        start: int,
        root: str,
        layout: str,
        attribute: str,
        errors: list[Any],
        seconds: float,
    ) -> BatchManifest:
        """The manifest of a `CheckpointWrapper.transform_samples` report.

        ``report`` is a `samplepipe.storage.TransformReport`; a dict (the
        report up to 0.5.0) is deprecated.
        """
        if not isinstance(report, TransformReport):
            warnings.warn(
                "BatchManifest.from_report of a dict is deprecated since samplepipe "
                "0.6; give a samplepipe.storage.TransformReport (transform_samples("
                "..., report=TransformReport()), or TransformReport.from_dict).",
                DeprecationWarning,
                stacklevel=3,
            )
            report = TransformReport.from_dict(report)
        n = len(report)
        nothing: list[None] = [None] * n
        records = report.records or nothing
        entries = report.entries or nothing
        names: dict[str, int] = {}
        stamps: list[Stamp] = []
        name_of = np.full(n, -1, dtype=np.int32)
        rows = np.zeros((n, 2), dtype=np.int64) if layout == "shards" else None
        checksums: list[str] = []
        kinds: list[str] = []
        inputs: list[str] = []
        for i, (path, st, digest, record, entry) in enumerate(
            zip(report.paths, report.stamps, report.inputs, records, entries)
        ):
            if st is None or path is None or digest is None:  # the sample failed
                checksums.append("")
                kinds.append("")
                inputs.append("")
                continue
            inputs.append(digest)
            name = relative_location(path, root)
            at = names.get(name)
            if at is None:
                at = names[name] = len(stamps)
                stamps.append(st)
            name_of[i] = at
            if entry is not None:  # a shard's entry
                assert rows is not None
                rows[i] = (entry.group, entry.row)
                checksum, kind = entry.checksum, entry.kind
            elif record is not None:
                fields = Record.parse(record)
                checksum, kind = fields.checksum, fields.kind
            else:  # custom load_func: the loader reads the record
                checksum = kind = ""
            checksums.append(checksum)
            kinds.append(kind)
        return cls(
            step=step,
            start=start,
            root=root,
            identity=report.step,
            layout=layout,
            keys=_joined(keys),
            inputs=_joined(inputs),
            names=list(names),
            stamps=np.array(stamps, dtype=np.int64).reshape(-1, 4),
            name_of=name_of,
            rows=rows,
            checksums=_joined(checksums),
            kinds=_joined(kinds),
            computed=report.computed,
            loaded=report.loaded,
            failed=report.failed,
            errors=errors,
            seconds=seconds,
            attribute=attribute,
        )

    def chain_digest(self) -> str:
        """Digest of the outputs: step identity, keys, input identities, failures.

        Equal digests mean equal per-sample output identities (each is a
        function of the format, the step's identity, the input identity and
        the key), in the same order.
        """
        h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
        for part in (
            f"{MANIFEST_FORMAT}:{FORMAT_VERSION}",
            self.identity or "",
            self.attribute,
            self.keys,
            self.inputs,
        ):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        h.update((self.name_of < 0).tobytes())
        return h.hexdigest()

    # -- serialising ---------------------------------------------------------
    def to_bytes(self) -> bytes:
        def array(a: np.ndarray | None) -> Any:
            if a is None:
                return None
            return [a.dtype.str, list(a.shape), base64.b64encode(a.tobytes()).decode()]

        header = {
            "step": self.step,
            "start": self.start,
            "root": self.root,
            "identity": self.identity,
            "layout": self.layout,
            "keys": self.keys,
            "inputs": self.inputs,
            "names": self.names,
            "stamps": array(self.stamps),
            "name_of": array(self.name_of),
            "rows": array(self.rows),
            "checksums": self.checksums,
            "kinds": self.kinds,
            "computed": self.computed,
            "loaded": self.loaded,
            "failed": self.failed,
            "errors": self.errors,
            "seconds": self.seconds,
            "attribute": self.attribute,
            "digest": self.digest,
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        # Prefect stores a result's bytes as text: compressed, then base64
        return _MAGIC + base64.b64encode(zlib.compress(text, 1))

    @classmethod
    def from_bytes(cls, blob: bytes) -> BatchManifest:
        if not blob.startswith(_MAGIC):
            raise StaleManifestError("manifest of another samplepipe version")
        try:
            packed = base64.b64decode(blob[len(_MAGIC) :])
            header = json.loads(zlib.decompress(packed))

            def array(spec: Any) -> Any:
                if spec is None:
                    return None
                dtype, shape, data = spec
                raw = base64.b64decode(data)
                return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()

            for name in ("stamps", "name_of", "rows"):
                header[name] = array(header[name])
            manifest = cls(**header)
        except (ValueError, TypeError, KeyError, zlib.error) as exc:
            msg = f"unreadable manifest ({exc})"
            raise StaleManifestError(msg) from exc
        if manifest.digest != manifest.chain_digest():
            raise StaleManifestError("manifest whose digest does not match")
        return manifest

    # -- reading -------------------------------------------------------------
    def key_list(self) -> list[str]:
        return _split(self.keys, len(self))

    def recorded_stamps(self) -> list[tuple[str, Stamp]]:
        """``(path, recorded stamp)`` of every file the manifest names, once each."""
        join = join_location if is_url(self.root) else os.path.join
        return [
            (join(self.root, name), Stamp(*(int(v) for v in st)))
            for name, st in zip(self.names, self.stamps)
        ]

    def check_files(
        self, storage_options: Mapping[str, Any] | None = None, *, stored: bool
    ) -> None:
        """Raise `StaleManifestError` unless every named file is unchanged.

        With ``stored=False`` local files are checked (one ``os.stat`` each);
        with ``stored=True`` files at URLs (one ``HEAD`` request each).
        """
        for path, recorded in self.recorded_stamps():
            if is_url(path) != stored:
                continue
            try:
                st = (
                    stamp_of(path, storage_options)
                    if stored
                    else Stamp.of(os.stat(path))
                )
            except OSError as exc:
                raise StaleManifestError(f"{path} is gone") from exc
            if st is None:
                raise StaleManifestError(f"{path} is gone")
            if st != recorded:
                raise StaleManifestError(f"{path} changed since it was recorded")

    def samples(self, inputs: Sequence[Any], step: CheckpointWrapper) -> list[Any]:
        """Output samples: lazy loaders of the checkpoints, metadata of ``inputs``.

        Raises `StaleManifestError` unless the manifest names exactly this
        batch's checkpoints (keys in order, files inside the step's folder,
        of the step's layout) and, on an object store, they are unchanged.
        """
        keys = [getattr(s, "key", None) for s in inputs]
        attribute = step.checkpointed_attribute()
        out = []
        with gc_paused():  # a few acyclic objects per sample
            for s, loader in zip(inputs, self.loaders(keys, step)):
                if loader is None:
                    out.append(failed_output(s, attribute))
                else:
                    out.append(lazy_output(s, attribute, loader))
        return out

    def loaders(self, keys: Sequence[Any], step: CheckpointWrapper) -> list[Any]:
        """A loader of each sample's checkpoint (None: the sample failed).

        Checked first as `validate` does.
        """
        with gc_paused():
            return self._loaders(keys, step)

    def _loaders(self, keys: Sequence[Any], step: CheckpointWrapper) -> list[Any]:
        make = self._loader_maker(keys, step)
        return [make(i) for i in range(len(self))]

    def _loader_maker(self, keys: Sequence[Any], step: CheckpointWrapper) -> Any:
        """``make(i)``: the loader of sample ``i`` (None: it failed); checked."""
        n = len(self)
        paths = self.validate(keys, step)
        stored = is_url(self.root)
        options = step.storage_options if stored else None
        _, load_func = format_funcs(step.checkpoint_format())
        inputs_ = _split(self.inputs, n)
        checksums = _split(self.checksums, n)
        kinds = _split(self.kinds, n)
        stamps = [Stamp(*(int(v) for v in st)) for st in self.stamps]
        name_of = self.name_of.tolist()
        rows = self.rows.tolist() if self.rows is not None else None
        sharded = self.layout == "shards"
        step_identity = self.identity or ""

        def make(i: int) -> Any:
            at = name_of[i]
            if at < 0:
                return None
            identity = Identity(step_identity, inputs_[i], str(keys[i]))
            if sharded:
                assert rows is not None
                group, row = rows[i]
                where = (group, row, checksums[i], kinds[i])
                return ShardLoader.make(paths[at], identity, stamps[at], options, where)
            record = None
            if checksums[i] and load_func is None:
                record = identity.record(checksums[i], kinds[i])
            return CheckpointLoader(
                paths[at], identity, stamps[at], load_func, options, record, False
            )

        make.paths = paths  # type: ignore[attr-defined]
        make.stamps = stamps  # type: ignore[attr-defined]
        make.kinds = kinds  # type: ignore[attr-defined]
        return make

    def stacked(self, keys: Sequence[Any], step: CheckpointWrapper) -> np.ndarray:
        """Every sample's checkpointed array, stacked in one array.

        Shards are read a shard at a time: the first entry of each shard is
        loaded as a sample loads (read, verified, the shard kept in memory
        under its stamp, see `ShardLoader`), the others are taken from the
        kept payloads with one fancy-indexed copy per group, as their loaders
        would (a payload kept under the stamp it was validated with); anything
        else loads sample by sample. Raises ``ValueError`` naming the failed
        samples if there are any (they have no value).
        """
        failed = np.flatnonzero(self.name_of < 0).tolist()
        if failed:
            shown = ", ".join(repr(keys[i]) for i in failed[:5])
            msg = (
                f"{len(failed)} sample(s) failed and have no value to stack: {shown}; "
                "iterate the outputs instead (failed samples are None)."
            )
            raise ValueError(msg)
        with gc_paused():
            make = self._loader_maker(keys, step)
        n = len(self)
        if n == 0:
            return np.empty((0,))
        first = make(0)()
        if self.layout != "shards" or not isinstance(first, np.ndarray):
            return np.stack([first] + [make(i)() for i in range(1, n)])
        out = np.empty((n, *first.shape), dtype=first.dtype)
        out[0] = first
        done = np.zeros(n, dtype=bool)
        done[0] = True
        assert self.rows is not None
        groups, rows = self.rows[:, 0], self.rows[:, 1]
        plain = np.array([k == "a" for k in make.kinds], dtype=bool)
        for at in np.unique(self.name_of).tolist():
            members = np.flatnonzero(self.name_of == at)
            head = int(members[0])
            loader = make(head)
            if not done[head]:
                value = loader()  # reads and verifies the shard if not kept
                if not _fits(value, first):
                    return np.stack([make(i)() for i in range(n)])
                out[head] = value
                done[head] = True
            fs = filesystem(make.paths[at], step.storage_options)
            cached = DATA.get(f"{fs.token}|{make.paths[at]}")
            if cached is None or cached[0] != make.stamps[at]:
                continue
            for g in np.unique(groups[members]).tolist():
                array = cached[1].get(g)
                if array is None or not _fits(array[:0], first, rows_of=True):
                    continue
                mine = members[
                    (groups[members] == g)
                    & plain[members]
                    & ~done[members]
                    & (rows[members] >= 0)
                    & (rows[members] < len(array))
                ]
                if len(mine) == 0:
                    continue
                picked = rows[mine]
                i0, r0, k = int(mine[0]), int(picked[0]), len(mine)
                if (
                    int(mine[-1]) - i0 == k - 1
                    and int(picked[-1]) - r0 == k - 1
                    and (
                        k < 3
                        or (np.all(np.diff(mine) == 1) and np.all(np.diff(picked) == 1))
                    )
                ):
                    out[i0 : i0 + k] = array[r0 : r0 + k]  # in order: one copy
                else:
                    out[mine] = array[picked]
                done[mine] = True
        for i in np.flatnonzero(~done).tolist():  # sample by sample
            value = make(i)()
            if not _fits(value, first):
                return np.stack([make(j)() for j in range(n)])
            out[i] = value
        return out

    def validate(self, keys: Sequence[Any], step: CheckpointWrapper) -> list[str]:
        """Check that this manifest is the batch of ``keys`` through ``step``.

        Returns the full path of each named file. Raises `StaleManifestError`
        unless it names exactly these keys in order, files inside the step's
        folder, of the step's layout and, on an object store, unchanged.
        """
        n = len(self)
        if len(keys) != n:
            msg = f"manifest names {n} samples for a batch of {len(keys)}"
            raise StaleManifestError(msg)
        kind = layout_kind(step)
        if self.layout != kind:
            msg = f"manifest of layout={self.layout!r}, the step has {kind!r}"
            raise StaleManifestError(msg)
        mine = self.key_list()
        if mine != list(keys):
            at = next(i for i, (a, b) in enumerate(zip(mine, keys)) if a != b)
            msg = f"manifest names key {mine[at]!r} for sample {keys[at]!r}"
            raise StaleManifestError(msg)
        if n and self.identity is None and (self.name_of >= 0).any():
            raise StaleManifestError("manifest without a step identity")
        if is_url(self.root):
            self.check_files(step.storage_options, stored=True)
        return self._paths(step, mine)

    def _paths(self, step: CheckpointWrapper, keys: list[str]) -> list[str]:
        """The full path of each named file, checked to be inside the step's folder."""
        root = self.root
        folder = normalize_location(step.features_dir or "")
        join = join_location if is_url(root) else os.path.join
        paths = [join(root, name) for name in self.names]
        if self.layout == "shards":
            for name, path in zip(self.names, paths):
                if root != folder or not _is_relative_name(name):
                    msg = f"manifest names {path!r}, outside the step's folder"
                    raise StaleManifestError(msg)
            return paths
        expected = step.checkpoint_names(keys)
        if step.features_dir is None:
            raise StaleManifestError("the step has no features_dir")
        features_root = location_root(step.features_dir)
        for i, at in enumerate(self.name_of.tolist()):
            if at < 0:
                continue
            name = self.names[at]
            if root == folder and name == expected[i]:
                continue
            if normalize_location(paths[at]) != normalize_location(
                join(features_root, expected[i])
            ):
                msg = f"manifest names {paths[at]!r} for sample {keys[i]!r}"
                raise StaleManifestError(msg)
        return paths


def _fits(value: Any, first: np.ndarray, rows_of: bool = False) -> bool:
    """Whether ``value`` (or the rows of ``value``) has ``first``'s shape and dtype."""
    if not isinstance(value, np.ndarray) or value.dtype != first.dtype:
        return False
    return (value.shape[1:] if rows_of else value.shape) == first.shape


def _is_relative_name(name: Any) -> bool:
    """Whether ``name`` is a path inside its root (the rules of keys)."""
    try:
        check_key(name, owner="manifest")
    except (TypeError, ValueError):
        return False
    return True
