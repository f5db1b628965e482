"""The ``"files"`` layout: one checkpoint file per sample (`FilesLayout`)."""

from __future__ import annotations

import errno
import os
import posixpath
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .. import checkpoints as ckpt
from ..checkpoints import CheckpointLoader, UnknownFileError
from ..files import _owner_alive as temporary_owner_alive
from ..files import (
    is_permanent,
    is_temporary_file,
    remove_stale_temporaries,
)
from ..formats import Format
from ..fs import relative_location
from ..identity import Identity
from ..report import TransformReport
from ..status import Status
from .base import Judged, Layout, LayoutContext, Walked, format_funcs

__all__ = ["FilesLayout"]


def key_from_relative(rel: str, hash_fn: Callable[[str], Any] | None) -> str | None:
    """The key of a file at ``rel`` (without extension); None if it is not one."""
    if hash_fn is None:
        return rel
    parts = rel.split("/")
    for i in range(1, len(parts)):
        key = "/".join(parts[i:])
        try:
            if str(hash_fn(key)) == "/".join(parts[:i]):
                return key
        except Exception:  # noqa: BLE001 - a hash_fn that rejects the name
            continue
    return None


def _folder_exists(path: str) -> IsADirectoryError:
    msg = (
        f"CheckpointWrapper cannot write checkpoint {path!r}: a "
        "folder of that name exists; remove it or change the key."
    )
    return IsADirectoryError(errno.EISDIR, msg)


class FilesLayout(Layout):
    """One file per sample: ``<root>/[<hash_fn(key)>/]<key><extension>``.

    The seed's layout and the default. Each file holds (or, for formats with a
    sidecar, sits beside) its record: the identity that made it and the
    checksum of its payload. Every format and ``hash_fn`` apply.

    Subclasses may override `names` to place the files elsewhere under
    ``root``; `walk` finds a file's key again with `key_of`.
    """

    name = "files"

    # -- where checkpoints live -------------------------------------------
    def key_of(self, context: LayoutContext, rel: str) -> str | None:
        """The key of the file at ``rel`` (relative to ``root``, without its
        extension), None when `names` would not give that path to any key."""
        return key_from_relative(rel, context.hash_fn)

    # -- a batch -----------------------------------------------------------
    def transform(  # noqa: D102 - see Layout.transform
        self,
        context: LayoutContext,
        wanted: Sequence[Identity],
        live: Sequence[int],
        compute: Callable[[Sequence[int]], Mapping[int, Any]],
        report: TransformReport | None = None,
    ) -> list[Callable[[], Any] | None]:
        paths = self.paths(context, (i.key for i in wanted))
        save, load = format_funcs(context.format)
        custom = save is not None
        fs = context.fs
        options = context.loader_options
        n = len(wanted)
        stamps: list[Any] = [None] * n
        records: list[str | None] = [None] * n  # verified, for loaders
        todo: list[int] = []
        bad: dict[str, int] = {}
        unknown: list[str] = []
        for i in live:
            path, ident = paths[i], wanted[i]
            state, st, record = (
                (Status.MISSING, None, None)
                if context.force
                else ckpt.check(path, ident, custom, fs=fs)
            )
            if state == Status.VALID:
                stamps[i] = st
                records[i] = record
            elif state == Status.UNKNOWN:
                if fs.isdir(path):
                    raise _folder_exists(path)
                unknown.append(path)
            else:
                todo.append(i)
                if state != Status.MISSING:
                    bad[state] = bad.get(state, 0) + 1
        if unknown:
            msg = (
                f"{context.name} will not overwrite "
                f"{len(unknown)} file(s) that samplepipe did not write, e.g. "
                f"{unknown[0]!r}: move them away or choose another features_dir."
            )
            raise UnknownFileError(errno.EEXIST, msg)
        if bad:
            context.warn_recomputed(
                bad,
                "corrupt: unreadable or failing its checksum; foreign: holds "
                "another key",
            )
        outputs = compute(todo) if todo else {}
        computed = 0
        if outputs:
            context.describe(wanted[0].step)
        fmt = context.format
        for i, value in outputs.items():  # an unsupported value writes nothing
            if value is not None:
                self.encode(context, value, wanted[i], check=fmt)
        folders: set[str] = set()
        written: list[tuple[str, Any, str]] = []  # for the journal (local HDF5)
        payloads: dict[int, Any] = {}  # where this process wrote each payload
        for i, value in outputs.items():
            if value is None:
                continue
            # one file image at a time: memory stays that of the outputs
            encoded = None if custom else self.encode(context, value, wanted[i])
            self.prepare_folder(context, fs.dirname(paths[i]), folders)
            stamps[i] = self.save_one(context, paths[i], encoded, wanted[i], value)
            if encoded is not None:
                records[i] = encoded.record
                if fs.local:
                    written.append((paths[i], stamps[i], encoded.record))
                    payloads[i] = encoded.payload_at
            computed += 1
        ckpt.journal_written(written)
        loaders: list[Callable[[], Any] | None] = []
        for i, (path, ident, st, record) in enumerate(
            zip(paths, wanted, stamps, records)
        ):
            if not context.loaders:
                break
            if st is None:
                loaders.append(None)
            else:
                loaders.append(
                    CheckpointLoader(
                        path, ident, st, load, options, record, True, payloads.get(i)
                    )
                )
        if report is not None:
            failed = stamps.count(None)
            report.fill(
                TransformReport(
                    computed=computed,
                    loaded=n - failed - computed,
                    recomputed=sum(bad.values()),
                    failed=failed,
                    step=wanted[0].step if wanted else None,
                    inputs=[i.inputs for i in wanted],
                    paths=list(paths),
                    stamps=stamps,
                    records=records,
                )
            )
        return loaders

    def encode(
        self,
        context: LayoutContext,
        value: Any,
        identity: Identity,
        check: Format | None = None,
    ) -> ckpt.Encoded | None:
        """The HDF5 image and record of ``value``; with ``check`` (a format),
        only check that the format can store it.

        ``TypeError`` naming the sample for a value the format cannot store.
        """
        try:
            if check is not None:
                check.check_value(value)  # HDF5: copies nothing
                return None
            return ckpt.encode_default(value, identity)
        except TypeError as exc:
            msg = (
                f"{context.name} cannot checkpoint the output "
                f"of sample {identity.key!r}: {exc} Nothing of this batch was "
                "written."
            )
            raise TypeError(msg) from exc

    def save_one(
        self,
        context: LayoutContext,
        path: str,
        encoded: Any,
        identity: Identity,
        value: Any,
    ) -> Any:
        """Write one checkpoint (``encoded``: `ckpt.Encoded`, None for a
        sidecar format) and return its stamp; transient errors are retried."""
        fs = context.fs
        folder = os.path.dirname(path)
        fmt = None if encoded is not None else context.format
        last: OSError | None = None
        for attempt in range(context.attempts):
            try:
                if not fs.local:
                    return self._save_stored(context, path, encoded, identity, value)
                if os.path.isdir(path):
                    raise _folder_exists(path)
                if attempt:  # made by prepare_folder; removed since?
                    os.makedirs(folder, exist_ok=True)
                if fmt is None:
                    record = encoded.record
                    ckpt.write_default(path, encoded.blob)
                else:
                    record = fmt.write(path, value, identity)
                st = ckpt.stamp(path)
                assert st is not None
                ckpt.remember(path, fmt is not None, st, record)
                return st
            except OSError as exc:
                last = exc
                if is_permanent(exc) or attempt + 1 == context.attempts:
                    break
                time.sleep(min(0.1 * 2**attempt, 2.0))
        msg = f"CheckpointWrapper could not write checkpoint {path!r}: {last}"
        raise OSError(getattr(last, "errno", None), msg) from last

    def _save_stored(
        self,
        context: LayoutContext,
        path: str,
        encoded: Any,
        identity: Identity,
        value: Any,
    ) -> Any:
        """`save_one` on a store: one atomic write (a PUT on object stores)."""
        fs = context.fs
        if encoded is not None:
            record = encoded.record
            st = fs.write_bytes(path, encoded.blob)
        else:
            record, st = context.format.write_stored(path, value, identity, fs)
        ckpt.remember(path, encoded is None, st, record, fs)
        return st

    def prepare_folder(
        self, context: LayoutContext, folder: str, seen: set[str]
    ) -> None:
        """Make ``folder`` (once per call), refusing one outside ``root``."""
        if folder in seen:
            return
        seen.add(folder)
        fs = context.fs
        if not fs.local:
            fs.makedirs(folder)
            fs.remove_stale_temporaries(folder)
            return
        root = os.path.realpath(context.root)
        real = os.path.realpath(folder)
        if real != root and not real.startswith(root + os.sep):
            msg = (
                f"CheckpointWrapper refuses to write into {folder!r}: it resolves to "
                f"{real!r}, outside features_dir {root!r} (a symbolic link?)."
            )
            raise ValueError(msg)
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)

    def judge_all(  # noqa: D102 - see Layout.judge_all
        self,
        context: LayoutContext,
        wanted: Sequence[Identity],
        loaders: bool = True,
        paths: Sequence[str] | None = None,
    ) -> list[Judged]:
        fs = context.fs
        options = context.loader_options
        load = format_funcs(context.format)[1]
        if paths is None:
            paths = self.paths(context, (i.key for i in wanted))
        judged: list[Judged] = []
        for path, ident in zip(paths, wanted):
            state, st, record = ckpt.check(
                path, ident, load is not None, fs=fs, any_record=True
            )
            loader = None
            if loaders and state == Status.VALID and st is not None:
                loader = CheckpointLoader(path, ident, st, load, options, record)
            judged.append((state, record, loader))
        return judged

    # -- the folder --------------------------------------------------------
    def walk(self, context: LayoutContext) -> Iterator[Walked]:  # noqa: D102
        extension = context.extension
        step = context.step()
        root = context.root
        fs = context.fs
        if not fs.local:
            for path, rel, size, listed in fs.walk_files(root):
                name = posixpath.basename(rel)
                if not is_temporary_file(name) and (
                    not name.endswith(extension) or name.endswith(".meta.json")
                ):
                    continue
                judged = self.judge(context, path, step, size, listed)
                if judged is not None:
                    yield (path, *judged)
            return
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                if not is_temporary_file(name) and (
                    not name.endswith(extension) or name.endswith(".meta.json")
                ):
                    continue
                judged = self.judge(context, path, step)
                if judged is not None:
                    yield (path, *judged)

    def judge(
        self,
        context: LayoutContext,
        path: str,
        step: str | None,
        size: int | None = None,
        listed: Any = None,
    ) -> tuple[Status, int, Any] | None:
        """``(status, size, stamp)`` of one file; None if it vanished.

        ``size`` and ``listed`` (a stamp) are what a store's listing gave:
        they save requests.
        """
        fs = context.fs
        if fs.local:
            try:
                size = os.lstat(path).st_size
            except FileNotFoundError:
                return None
            name = os.path.basename(path)
        else:
            if size is None:
                found = fs.stamp(path)
                if found is None:
                    return None
                size = found.size
            name = posixpath.basename(path)
        if is_temporary_file(name):
            alive = temporary_owner_alive(name)
            return (Status.WRITING if alive else Status.TEMPORARY), size, None
        if step is None:
            return Status.UNKNOWN, size, None
        save, _ = format_funcs(context.format)
        rel = relative_location(path, context.root)
        rel = rel[: -len(context.extension)]
        key = self.key_of(context, rel)
        state, stamp_, _ = ckpt.check(
            path,
            Identity(step, "", key or ""),
            save is not None,
            True,
            fs=fs,
            known=listed,
        )
        if key is None and state in (Status.VALID, Status.STALE, Status.FOREIGN):
            state = Status.FOREIGN
        if state == Status.MISSING:
            return None  # removed since it was listed
        return state, size, stamp_

    def remove(  # noqa: D102 - see Layout.remove
        self, context: LayoutContext, statuses: Sequence[str], dry_run: bool
    ) -> list[tuple[str, Status, int]]:
        save, _ = format_funcs(context.format)
        step = context.step()
        removed = []
        for path, state, size, stamp_ in list(self.walk(context)):
            if state not in statuses:
                continue
            if not dry_run and not self.still(context, path, state, stamp_, step):
                continue
            removed.append((path, state, size))
            if not dry_run:
                ckpt.remove(path, save is not None, context.fs)
        return removed

    def still(
        self,
        context: LayoutContext,
        path: str,
        state: Status,
        stamp_: Any,
        step: str | None,
    ) -> bool:
        """Whether ``path`` is unchanged and judged ``state`` again."""
        fs = context.fs
        if stamp_ is not None and fs.stamp(path) != stamp_:
            return False
        save, _ = format_funcs(context.format)
        ckpt.forget(path, save is not None, fs)  # judge from the file, not the cache
        again = self.judge(context, path, step)
        return again is not None and again[0] == state and again[2] == stamp_
