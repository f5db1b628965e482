"""The `Layout` base class, what a layout works on (`LayoutContext`), the registry."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import CheckpointWarning
from .._registry import register
from ..checkpoints import CheckpointLoader
from ..files import Stamp
from ..formats import CustomFormat, Format
from ..fs import FileSystem, join_location
from ..identity import Identity
from ..keys import check_key, is_url
from ..report import TransformReport
from ..status import Status

__all__ = [
    "Judged",
    "Layout",
    "LayoutContext",
    "Walked",
    "format_funcs",
    "gc_paused",
    "get_layout",
    "register_layout",
    "registered_layouts",
]

# (status, record, loader): how a layout judges one wanted checkpoint
Judged = tuple[Status, str | None, Callable[[], Any] | None]
# (path, status, size, stamp): one file under features_dir, as a layout sees it
Walked = tuple[str, Status, int, Stamp | None]

# a stamp no file has: a loader holding it checks its file before loading
NO_STAMP = Stamp(-1, -1, -1, -1)


def _no_step() -> str | None:
    return None


def format_funcs(fmt: Format) -> tuple[Any, Any]:
    """``(save, load)`` of a format with a sidecar record; (None, None) for HDF5.

    A loader (`CheckpointLoader`) takes the ``load`` function of a sidecar
    format; HDF5 keeps its record inside the file and needs none.

    Parameters
    ----------
    fmt : Format
        E.g. `CheckpointWrapper.checkpoint_format()`.

    Returns
    -------
    save, load : callable or None
        ``save(value, path)`` and ``load(path)`` (a custom format's
        ``save_func`` and ``load_func``), or None and None.
    """
    if isinstance(fmt, CustomFormat):
        return fmt.save_func, fmt.load_func
    if fmt.sidecar:
        return fmt.save, fmt.load
    return None, None


@dataclass(frozen=True)
class LayoutContext:
    """What a layout works on: one step's feature checkpoints, options resolved.

    `samplepipe.CheckpointWrapper` builds one from its parameters for each
    call; a layout reads it and keeps nothing of it.

    Attributes
    ----------
    root : str
        ``features_dir`` as a local path or a URL (see `location_root`).
    fs : FileSystem
        The filesystem of ``root``.
    storage_options : dict or None
        fsspec options for a URL (given to loaders of stored checkpoints).
    format : Format
        The file format of one sample's checkpoint.
    extension : str
        The file extension of one sample's checkpoint.
    name : str
        Who complains in messages, e.g. ``"CheckpointWrapper(scaler)"``.
    hash_fn : callable or None
        ``hash_fn(key)`` names a key's sub-folder.
    attempts : int
        How often a transient I/O error while writing is tried.
    force : bool
        Recompute and overwrite every checkpoint.
    shard_size, shard_bytes
        The wrapper's limits of a shard (see `samplepipe.storage.shards`).
    step : callable
        ``step()`` is the step identity that judges the files of the folder,
        None when the step's fitted state is unknown (every file ``unknown``).
    describe : callable
        ``describe(step)`` keeps the description of a step identity that
        writes checkpoints (see `CheckpointWrapper.explain`).
    parameters : dict
        The wrapper's parameters as given, for messages and checks.
    loaders : bool
        Whether the caller wants a loader of each checkpoint from
        `Layout.transform`; False (the flows, which read the report only): a
        layout may return an empty list.
    """

    root: str
    fs: FileSystem
    storage_options: Mapping[str, Any] | None
    format: Format
    extension: str
    name: str = "CheckpointWrapper"
    hash_fn: Callable[[str], Any] | None = None
    attempts: int = 10
    force: bool = False
    shard_size: Any = None
    shard_bytes: Any = None
    step: Callable[[], str | None] = _no_step
    describe: Callable[[str], None] = lambda step: None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    loaders: bool = True

    @property
    def loader_options(self) -> Mapping[str, Any] | None:
        """The storage options a lazy loader keeps (None for local files)."""
        return None if self.fs.local else self.storage_options

    def warn_recomputed(
        self, bad: Mapping[str, int], more: str, stacklevel: int = 4
    ) -> None:
        """One `CheckpointWarning` for the checkpoints of a call judged ``bad``.

        ``bad`` counts them by status; ``more`` explains the statuses other
        than stale; ``stacklevel`` is that of `warnings.warn`, from here.
        """
        detail = ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))
        warnings.warn(
            f"{self.name} recomputes {sum(bad.values())} "
            f"checkpoint(s) in {self.root!r}: {detail} "
            "(stale: made by other code, parameters, fitted model or input; "
            f"{more}).",
            CheckpointWarning,
            stacklevel=stacklevel,
        )


class Layout:
    """Base class of a layout: where and how a step's checkpoints are stored.

    A layout decides where each sample's checkpoint lives, judges the
    checkpoints wanted by a batch, writes the ones computed, and lists, removes
    and compacts what its folder holds. It holds no state of its own (one
    instance may serve many wrappers) and must pickle; everything about the
    step comes in a `LayoutContext`. Register a subclass with
    `register_layout` to use it as ``CheckpointWrapper(layout=name)``, or give
    an instance.

    The promises of every layout: a checkpoint is reused only when it holds
    the identity wanted (`samplepipe.storage.Identity`); a file the layout did
    not write is never overwritten or removed; every write is atomic.

    Attributes
    ----------
    name : str
        The registered name (shown in messages).
    """

    name: ClassVar[str] = ""

    # -- parameters --------------------------------------------------------
    def check_parameters(self, parameters: Mapping[str, Any]) -> None:
        """Refuse wrapper parameters this layout cannot honour (`ValueError`).

        Called before the format is resolved; ``parameters`` holds the
        wrapper's options (``save_func`` and ``load_func`` as resolved,
        ``hash_fn``, ``shard_size``, ``shard_bytes``, ``format``, ``layout``).
        """

    def check_format(self, fmt: Format, parameters: Mapping[str, Any]) -> None:
        """Refuse a file format this layout cannot store (`ValueError`)."""

    # -- where checkpoints live -------------------------------------------
    def names(self, context: LayoutContext, keys: Iterable[str]) -> list[str]:
        """Each key's checkpoint path inside ``root``, ``/``-separated.

        ``<key><extension>``, under the bucket that ``hash_fn`` gives the key
        if it is set. Each key (and bucket) is checked first (see `check_key`).
        """
        extension = context.extension
        hash_fn = context.hash_fn
        names = []
        for key in keys:
            check_key(key)
            if hash_fn is None:
                names.append(key + extension)
                continue
            bucket = str(hash_fn(key))
            check_key(bucket, owner="CheckpointWrapper's hash_fn")
            names.append(f"{bucket}/{key}{extension}")
        return names

    def paths(self, context: LayoutContext, keys: Iterable[str]) -> list[str]:
        """`names` joined to ``root``: local paths, or URLs."""
        root = context.root
        if "://" in root and is_url(root):
            return [join_location(root, name) for name in self.names(context, keys)]
        return [os.path.join(root, name) for name in self.names(context, keys)]

    # -- a batch -----------------------------------------------------------
    def transform(
        self,
        context: LayoutContext,
        wanted: Sequence[Identity],
        live: Sequence[int],
        compute: Callable[[Sequence[int]], Mapping[int, Any]],
        report: TransformReport | None = None,
    ) -> list[Callable[[], Any] | None]:
        """Load valid checkpoints, compute and write the others.

        Parameters
        ----------
        context : LayoutContext
        wanted : list of Identity
            The identity each sample's checkpoint must hold.
        live : list of int
            The positions of the samples to checkpoint (the others failed
            upstream: no call, no file).
        compute : callable
            ``compute(positions)`` returns ``{position: value}`` (None for a
            sample the estimator failed).
        report : TransformReport, default=None
            Filled with what the call did (`TransformReport.fill` a report
            built by the layout): the counts, and per sample its input
            identity, file, stamp and record or shard entry.

        Returns
        -------
        loaders : list
            For each sample, a loader of its checkpoint, or None when it has
            none (failed); may be empty when ``context.loaders`` is False.
        """
        raise NotImplementedError

    def judge_all(
        self,
        context: LayoutContext,
        wanted: Sequence[Identity],
        loaders: bool = True,
        paths: Sequence[str] | None = None,
    ) -> list[Judged]:
        """``(status, record, loader)`` of each wanted checkpoint, read-only."""
        raise NotImplementedError

    def planned(
        self, context: LayoutContext, wanted: Sequence[Identity]
    ) -> list[Callable[[], Any]]:
        """A loader per wanted checkpoint, valid or not (`planned_outputs`)."""
        paths = self.paths(context, (i.key for i in wanted))
        load = format_funcs(context.format)[1]
        options = context.loader_options
        planned: list[Callable[[], Any]] = []
        for p, i, (_, _, loader) in zip(
            paths, wanted, self.judge_all(context, wanted, paths=paths)
        ):
            if loader is None:  # loads once transform has written it
                loader = CheckpointLoader(p, i, NO_STAMP, load, options)
            planned.append(loader)
        return planned

    # -- the folder --------------------------------------------------------
    def walk(self, context: LayoutContext) -> Iterator[Walked]:
        """``(path, status, size, stamp)`` of every file under ``root``."""
        raise NotImplementedError

    def remove(
        self, context: LayoutContext, statuses: Sequence[str], dry_run: bool
    ) -> list[tuple[str, Status, int]]:
        """Remove files of ``statuses``, each judged again right before."""
        raise NotImplementedError

    def compact(
        self,
        context: LayoutContext,
        shard_size: int | None = None,
        shard_bytes: int | str | None = None,
    ) -> dict[str, Any]:
        """Merge small files into full ones; `ValueError` if the layout cannot."""
        parameters = context.parameters
        msg = (
            f"CheckpointWrapper.compact_checkpoints needs layout='shards' and a "
            f"features_dir; got layout={parameters.get('layout')!r}, "
            f"features_dir={parameters.get('features_dir')!r}."
        )
        raise ValueError(msg)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------
_LAYOUTS: dict[str, type[Layout]] = {}
_BUILT_IN = ("files", "shards")


def register_layout(name: str, cls: type[Layout]) -> None:
    """Register a `Layout` subclass under ``name``, for ``layout=name``.

    Registering a name again replaces its class (joblib's
    ``register_store_backend`` does the same); the built-in names
    (``"files"``, ``"shards"``) cannot be replaced.

    Parameters
    ----------
    name : str
        Letters, digits, ``_``, ``-`` or ``.``.
    cls : type
        A subclass of `Layout`, built without arguments when a wrapper uses
        the name.

    Raises
    ------
    ValueError
        For a malformed name or a built-in one already registered.
    TypeError
        When ``cls`` is not a `Layout` subclass.
    """
    register(_LAYOUTS, _BUILT_IN, "layout", Layout, name, cls)


def registered_layouts() -> list[str]:
    """The names ``layout=`` accepts, sorted."""
    return sorted(_LAYOUTS)


def get_layout(layout: str | Layout, who: str = "get_layout") -> Layout:
    """The `Layout` of ``layout``: a registered name, or an instance as it is.

    ``who`` names the caller in messages (e.g. ``"CheckpointWrapper"``).

    Raises
    ------
    ValueError
        For a name no layout is registered under (the message lists them).
    TypeError
        For anything but a str or a `Layout` instance.
    """
    if isinstance(layout, Layout):
        return layout
    expected = (
        "it must be 'files' (one file per sample), 'shards' (one file per "
        "batch) or another name registered with samplepipe.storage."
        f"register_layout (registered: {registered_layouts()}), or a "
        "samplepipe.storage.Layout instance."
    )
    if not isinstance(layout, str):
        msg = f"{who} got layout={layout!r}; {expected}"
        raise TypeError(msg)
    cls = _LAYOUTS.get(layout)
    if cls is None:
        msg = f"{who} got layout={layout!r}; {expected}"
        raise ValueError(msg)
    return cls()


# ---------------------------------------------------------------------------
# the garbage collector, paused for bookkeeping
# ---------------------------------------------------------------------------
_GC_LOCK = threading.Lock()
_GC_PAUSES = [0, False]  # how many pauses are running; whether gc was enabled


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while samplepipe builds objects.

    Building a batch's identities, index lookups and output samples makes a
    few objects per sample, none of them cyclic; with the collector running,
    its full passes over every live object took a third of a re-run's time
    (10,000 samples). Only samplepipe's own bookkeeping runs paused, never the
    wrapped estimator. Nested and concurrent pauses (threads) re-enable the
    collector once, when the last one ends, and only if it was enabled.
    """
    with _GC_LOCK:
        if _GC_PAUSES[0] == 0:
            _GC_PAUSES[1] = gc.isenabled()
            gc.disable()
        _GC_PAUSES[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES[0] -= 1
            if _GC_PAUSES[0] == 0 and _GC_PAUSES[1]:
                gc.enable()
