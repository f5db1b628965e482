"""Why a checkpoint is reused or recomputed, and a check that reused ones are right.

A step's identity is one digest; to say *what* changed, samplepipe keeps a
description of every step that wrote a checkpoint: the digest of each user
function and class method it reaches, the libraries and their versions, each
parameter (its digest and, when short, its value), the fitted state, the file
format and the checkpointed attribute. It is a small JSON file named after
the step identity, so it is written once and never changes, in a folder of
this user (``$SAMPLEPIPE_DESCRIPTIONS``; by default
``~/.cache/samplepipe/steps``, or under ``$XDG_CACHE_HOME``; ``off`` turns
descriptions off). A checkpoint's record names its step identity, so
`explain` finds the description of the step that wrote it and compares it
with the present one. Never inside ``features_dir``, which holds only
checkpoints. A description that is missing (written on another host, or
removed) costs the name of what changed, never a wrong verdict: whether a
checkpoint is reused comes from its record alone.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage import Identity, Status
from ..storage.identity import FORMAT_VERSION, ingredients
from ._sample import lazy_output

if TYPE_CHECKING:
    from ..storage.layouts import Layout, LayoutContext

#: What `Explanation.reason` can be: the ingredients of the README's identity
#: table, and the state of the file.
REASONS = (
    "same",
    "code",
    "parameter",
    "input",
    "fitted",
    "format",
    "library",
    "missing",
    "damaged",
)

ENV = "SAMPLEPIPE_DESCRIPTIONS"
DESCRIPTION_VERSION = 1

_written: set[tuple[str, str]] = set()  # (folder, step) described by this process
_written_lock = threading.Lock()


@dataclass(frozen=True)
class Explanation:
    """Whether one sample's checkpoint is reused, and why or why not.

    Attributes
    ----------
    key : str
        The sample's key.
    action : {"reuse", "recompute"}
        What ``transform`` would do now.
    reason : str
        One of `REASONS`: ``"same"`` for a reused checkpoint, else the
        ingredient that differs (``"code"``, ``"parameter"``, ``"input"``,
        ``"fitted"``, ``"format"``, ``"library"``) or the state of the file
        (``"missing"``, ``"damaged"``).
    detail : str
        One sentence naming the ingredient: the function or method whose code
        changed, the parameter (with its old and new value when printable),
        the kind of input, the library and its versions, or the file's problem.
    """

    key: str
    action: str
    reason: str
    detail: str


@dataclass
class VerifyReport:
    """What `CheckpointWrapper.verify` checked.

    Attributes
    ----------
    reused : int
        Samples whose checkpoint ``transform`` would reuse.
    checked : int
        Of those, the samples recomputed in memory and compared.
    mismatches : list of str
        Keys of the checked samples whose checkpoint differs from the value
        computed now: a step that is not deterministic, or that depends on
        something its identity cannot see.
    """

    reused: int = 0
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# step descriptions
# ---------------------------------------------------------------------------
def descriptions_dir() -> str | None:
    """The folder of step descriptions; None when ``$SAMPLEPIPE_DESCRIPTIONS=off``."""
    configured = os.environ.get(ENV, "")
    if configured == "off":
        return None
    if configured:
        return configured
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "samplepipe", "steps")


def write_description(step: str, describe: Any) -> None:
    """Keep ``describe()`` as the description of step identity ``step``, once.

    Written atomically under its step identity, so a file that exists holds
    the same description already. A folder that cannot be written costs
    `explain` its names only: the error is not raised.
    """
    folder = descriptions_dir()
    if folder is None:
        return
    with _written_lock:
        if (folder, step) in _written:
            return
    path = os.path.join(folder, f"{step}.json")
    try:
        if not os.path.exists(path):
            description = describe()
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{step}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(description, f, sort_keys=True, indent=1)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError:
        return
    with _written_lock:
        _written.add((folder, step))


def read_description(step: str) -> dict[str, Any] | None:
    """The description of step identity ``step``; None if there is none."""
    folder = descriptions_dir()
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, f"{step}.json")) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("step") != step:
        return None
    return found


# ---------------------------------------------------------------------------
# explanations
# ---------------------------------------------------------------------------
def _names(changed: Iterable[str], limit: int = 3) -> str:
    names = sorted(changed)
    text = ", ".join(names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _value(entry: Any) -> str:
    printable = entry[1] if isinstance(entry, list) and len(entry) > 1 else None
    return printable if printable is not None else "(not printable)"


def step_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[str, str]:
    """``(reason, detail)`` for a checkpoint written by step ``old``, not ``new``."""
    if old is None:
        return (
            "format",
            "the step that wrote it is not described here (written by an older "
            "samplepipe, on another host, or its description was removed): what "
            "changed cannot be named",
        )
    code_old, code_new = old.get("code", {}), new["code"]
    changed = {n for n in code_new if n in code_old and code_old[n] != code_new[n]}
    if changed:
        return "code", f"the code of {_names(changed)} changed"
    added = set(code_new) - set(code_old)
    removed = set(code_old) - set(code_new)
    if added or removed:
        parts = []
        if added:
            parts.append(f"now reaches {_names(added)}")
        if removed:
            parts.append(f"no longer reaches {_names(removed)}")
        return "code", "the step's code " + " and ".join(parts)
    params_old, params_new = old.get("parameter", {}), new["parameter"]
    for name in sorted(set(params_old) | set(params_new)):
        before, after = params_old.get(name), params_new.get(name)
        if before is None or after is None or before[0] != after[0]:
            return (
                "parameter",
                f"parameter {name} changed from {_value(before)} to {_value(after)}",
            )
    libraries_old, libraries_new = old.get("library", {}), new["library"]
    for name in sorted(set(libraries_old) | set(libraries_new)):
        if libraries_old.get(name) != libraries_new.get(name):
            return (
                "library",
                f"library {name} changed from {libraries_old.get(name, 'none')} to "
                f"{libraries_new.get(name, 'none')}",
            )
    for ingredient in ("format", "attribute"):
        if old.get(ingredient) != new[ingredient]:
            return (
                "format",
                f"the checkpoint {ingredient} changed from "
                f"{old.get(ingredient)!r} to {new[ingredient]!r}",
            )
    if old.get("fitted") != new["fitted"]:
        return "fitted", "the fitted state changed (the step was fitted again)"
    return "code", "the step's identity changed in a part not described"


_INPUTS = {
    "c": "the checkpoint of an earlier step it was computed from changed",
    "l": "the sample's loader or its data_version changed",
    "v": "the content of its input changed",
}


def input_difference(old: str, new: str) -> str:
    """The sentence for a checkpoint computed from input digest ``old``."""
    kinds = {"c": "an earlier checkpoint", "l": "a loader", "v": "data in memory"}
    if old[:1] != new[:1] and old[:1] in kinds and new[:1] in kinds:
        return (
            f"its input was {kinds[old[:1]]} and is now {kinds[new[:1]]}, with "
            "another content"
        )
    return _INPUTS.get(new[:1], "its input (or the metadata the step reads) changed")


FILE_STATES = {
    Status.MISSING: ("missing", "no checkpoint yet"),
    Status.CORRUPT: ("damaged", "the file is unreadable or fails its checksum"),
    Status.FOREIGN: ("damaged", "the file holds another sample's key"),
    Status.UNKNOWN: (
        "damaged",
        "the file was not written by samplepipe: transform will not overwrite it",
    ),
}


def explain_one(
    key: str,
    state: Status,
    record: str | None,
    wanted: Identity,
    difference: Any,
) -> Explanation:
    """The `Explanation` of one checkpoint judged ``state`` holding ``record``.

    ``difference(step)`` returns the ``(reason, detail)`` of a checkpoint
    written by step identity ``step`` (see `step_difference`).
    """
    if state == Status.VALID:
        return Explanation(key, "reuse", "same", "every ingredient is the same")
    if state in FILE_STATES:
        reason, detail = FILE_STATES[state]
        return Explanation(key, "recompute", reason, detail)
    assert record is not None
    found, _, _ = Identity.parse(record)
    if found.format != wanted.format:
        return Explanation(
            key,
            "recompute",
            "format",
            f"written by an older samplepipe (record format {found.format}, "
            f"now {FORMAT_VERSION})",
        )
    if found.step != wanted.step:
        reason, detail = difference(found.step)
        return Explanation(key, "recompute", reason, detail)
    return Explanation(
        key, "recompute", "input", input_difference(found.inputs, wanted.inputs)
    )


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------
def choose(n: int, fraction: float, seed: int | None) -> list[int]:
    """Sorted indices of ``ceil(fraction * n)`` of ``range(n)``, drawn at random."""
    if not 0.0 < fraction <= 1.0:
        msg = f"verify got fraction={fraction!r}; use a number in (0, 1]."
        raise ValueError(msg)
    k = min(n, math.ceil(fraction * n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False)) if k else []


def same_value(stored: Any, fresh: Any, rtol: float, atol: float) -> bool:
    """Whether a checkpoint's value equals one computed now (within tolerances)."""
    if isinstance(stored, np.ndarray) or isinstance(fresh, np.ndarray):
        a, b = np.asarray(stored), np.asarray(fresh)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return False
        if a.dtype.kind in "fc" and (rtol or atol):
            return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(stored, float) and isinstance(fresh, float) and (rtol or atol):
        return math.isclose(stored, fresh, rel_tol=rtol, abs_tol=atol)
    try:
        return bool(stored == fresh)
    except (TypeError, ValueError):  # containers of arrays
        return repr(stored) == repr(fresh)


def count(explanations: Sequence[Explanation]) -> dict[str, int]:
    """Explanations counted by reason, in the order of `REASONS`."""
    counts = dict.fromkeys(REASONS, 0)
    for e in explanations:
        counts[e.reason] += 1
    return {r: n for r, n in counts.items() if n}


class Explaining:
    """The explaining half of `CheckpointWrapper`: why a checkpoint is (not)
    reused, what a step's identity is made of, spot checks of reused ones.

    A mixin: nothing here computes, writes or unpickles, except `verify`,
    which recomputes a sample of the reused checkpoints and writes nothing.
    """

    estimator: Any

    if TYPE_CHECKING:

        def check_parameters(self) -> None: ...
        def checkpointed_attribute(self) -> str: ...
        def _layout(self) -> Layout: ...
        def _context(self, located: bool = True) -> LayoutContext: ...
        def _format_identity(self) -> str: ...
        def _fitted_digest(self) -> str | None: ...
        def step_identity(self) -> str: ...
        def identities(self, samples: Sequence[Any]) -> list[Identity]: ...
        def _compute(
            self, samples: Sequence[Any], todo: Sequence[int], attribute: str
        ) -> dict[int, Any]: ...

    def describe_step(self) -> dict[str, Any]:
        """What `step_identity` is made of, by name (see `explain`).

        A dict with ``step`` (the identity), ``code`` (``{qualified name:
        digest}`` of every user function and method reached), ``library``
        (``{distribution: version}``), ``parameter`` (``{path: [digest,
        printable value or None]}``), ``fitted``, ``format`` and ``attribute``.
        """
        return {
            "samplepipe": DESCRIPTION_VERSION,
            "step": self.step_identity(),
            **ingredients(self.estimator),
            "fitted": str(self._fitted_digest()),
            "format": self._format_identity(),
            "attribute": self.checkpointed_attribute(),
        }

    def _describe(self, step: str) -> None:
        """Keep the description of step identity ``step`` (see `explain`)."""
        write_description(step, self.describe_step)

    def explain(self, samples: Sequence[Any]) -> list[Explanation]:
        """For each sample: would `transform` reuse its checkpoint, and if not, why.

        Nothing is computed, written or unpickled; each checkpoint's record
        is read (from the journal, where a process validated it) and compared
        with the identity the sample has now. A recomputed sample names the
        ingredient that differs: the code of a function or method (by
        qualified name), a parameter (its path, old and new value), its input
        (its content, an earlier checkpoint, its loader or ``data_version``),
        the fitted state, the format, or a library version; or the file's
        state (missing, damaged).

        Parameters
        ----------
        samples : list of Sample
            The samples ``transform`` would be given.

        Returns
        -------
        explanations : list of Explanation
            One per sample, in order: ``key``, ``action`` (``"reuse"`` or
            ``"recompute"``), ``reason`` (one of ``samplepipe.REASONS``) and
            ``detail`` (a sentence).

        Examples
        --------
        >>> import tempfile
        >>> import numpy as np
        >>> from sklearn.preprocessing import FunctionTransformer
        >>> from samplepipe import Sample, wrap
        >>> folder = tempfile.mkdtemp()
        >>> samples = [Sample(np.ones(2) * i, key=f"s{i}") for i in range(3)]
        >>> step = wrap(["sample", "checkpoint"], FunctionTransformer(np.sqrt),
        ...             features_dir=folder)
        >>> _ = step.transform(samples[:2])
        >>> [(e.action, e.reason) for e in step.explain(samples)]
        [('reuse', 'same'), ('reuse', 'same'), ('recompute', 'missing')]
        >>> step.set_params(estimator__estimator__kw_args={"out": None})
        CheckpointWrapper(...)
        >>> step.explain(samples)[0].detail
        "parameter estimator__kw_args changed from None to {'out': None}"
        """
        self.check_parameters()
        wanted = self.identities(samples)
        new = self.describe_step()
        differences: dict[str, tuple[str, str]] = {}

        def difference(step: str) -> tuple[str, str]:
            """What differs from the step that wrote a checkpoint (once per step)."""
            if step not in differences:
                old = read_description(step)
                differences[step] = step_difference(old, new)
            return differences[step]

        return [
            explain_one(i.key, state, record, i, difference)
            for i, (state, record, _) in zip(
                wanted, self._judge_all(wanted, loaders=False)
            )
        ]

    def _judge_all(
        self,
        wanted: Sequence[Identity],
        loaders: bool = True,
        paths: Sequence[str] | None = None,
    ) -> list[tuple[Status, str | None, Callable[[], Any] | None]]:
        """``(status, record, loader)`` of each checkpoint, read-only (see
        `samplepipe.storage.Layout.judge_all`), for `explain` and `verify`."""
        return self._layout().judge_all(self._context(), wanted, loaders, paths)

    def planned_outputs(self, samples: Sequence[Any]) -> list[Any]:
        """The samples `transform` would return, without computing or reading.

        Each one's checkpointed attribute names the checkpoint its identity
        gives (to be loaded only once ``transform`` has run), so the next step
        of a pipeline can be explained (`explain`) before anything runs.
        """
        wanted = self.identities(samples)
        attribute = self.checkpointed_attribute()
        loaders = self._layout().planned(self._context(), wanted)
        return [lazy_output(s, attribute, lo) for s, lo in zip(samples, loaders)]

    def verify(
        self,
        samples: Sequence[Any],
        fraction: float = 0.01,
        seed: int | None = None,
        rtol: float = 0.0,
        atol: float = 0.0,
    ) -> VerifyReport:
        """Recompute a random fraction of the reused samples and compare.

        Checks that a reused checkpoint is what a fresh run would give: a
        step that is not deterministic, or that depends on something its
        identity cannot see (a file it reads, an environment variable), shows
        up as mismatches. Nothing is written; the step must be fitted (or
        its model loadable, as for ``transform``).

        Parameters
        ----------
        samples : list of Sample
            The samples ``transform`` would be given.
        fraction : float, default=0.01
            The share of reused samples to recompute, in (0, 1]; at least one
            when any is reused.
        seed : int, default=None
            Seed of the random choice (None: a new choice each call).
        rtol, atol : float, default=0.0
            Tolerances for float arrays; 0 and 0 ask for exact equality.

        Returns
        -------
        report : VerifyReport
            ``reused``, ``checked`` and ``mismatches`` (the keys).
        """
        self.check_parameters()
        wanted = self.identities(samples)
        judged = self._judge_all(wanted)
        reused = [i for i, (state, _, _) in enumerate(judged) if state == Status.VALID]
        chosen = [reused[j] for j in choose(len(reused), fraction, seed)]
        report = VerifyReport(reused=len(reused), checked=len(chosen))
        if not chosen:
            return report
        fresh = self._compute(samples, chosen, self.checkpointed_attribute())
        for i in chosen:
            loader = judged[i][2]
            assert loader is not None
            if not same_value(loader(), fresh[i], rtol, atol):
                report.mismatches.append(wanted[i].key)
        return report
